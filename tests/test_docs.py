"""The documentation site builds in strict mode: no broken reference, link or include.

Skipped unless the ``docs`` extra is installed (``pip install -e '.[docs]'``), so the
default test run stays light. ``nox -s docs`` builds the same site; ``nox -s
docs_browser`` also renders it in headless Chromium.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import portal_pool

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 180


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


@pytest.mark.timeout(BUILD_TIMEOUT + 30)
def test_site_builds_with_every_page(site: Path) -> None:
    for page in [
        "index.html",
        "getting-started/index.html",
        "concepts/index.html",
        "hosts/index.html",
        "ray/index.html",
        "cancellation/index.html",
        "flow-control/index.html",
        "worker-resources/index.html",
        "asyncio-and-trio/index.html",
        "sync-frameworks/index.html",
        "free-threading/index.html",
        "performance/index.html",
        "reliability/index.html",
        "api/index.html",
        "changelog/index.html",
    ]:
        assert (site / page).is_file(), page


def test_api_page_documents_every_public_name(site: Path) -> None:
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in portal_pool.__all__:
        assert f'id="portal_pool.{name}"' in html, name
    # The reST roles of the docstrings became links, not literal text.
    assert ":class:" not in html
    assert ":meth:" not in html


def test_performance_page_shows_the_readme_table_and_chart(site: Path) -> None:
    html = (site / "performance" / "index.html").read_text(encoding="utf-8")
    assert "<!-- readme:bench -->" not in html
    assert "seed pattern" in html
    assert "<table>" in html
    assert 'src="../img/throughput.png"' in html
    assert (site / "img" / "throughput.png").stat().st_size > 0


def test_concepts_page_has_the_task_diagram(site: Path) -> None:
    html = (site / "concepts" / "index.html").read_text(encoding="utf-8")
    assert 'src="../img/task-trip.svg"' in html
    assert (site / "img" / "task-trip.svg").is_file()


def test_reliability_page_includes_the_readme_section(site: Path) -> None:
    html = (site / "reliability" / "index.html").read_text(encoding="utf-8")
    assert "readme:section" not in html
    assert "BrokenPortalPool" in html


def test_changelog_page_includes_the_changelog(site: Path) -> None:
    html = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "Unreleased" in html
    assert "--8&lt;--" not in html


def test_site_loads_nothing_from_the_network(site: Path) -> None:
    # Links to other sites are fine; scripts, styles and fonts must be served locally.
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        for attribute in ('<script src="http', '<link rel="stylesheet" href="http'):
            assert attribute not in html, page
        assert "fonts.googleapis.com" not in html, page
