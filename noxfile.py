"""Sessions: tests per Python, backend and host, lint, typecheck, bench, docs, ..."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# Only the interpreters this machine has: nox would otherwise fail on a missing one.
AVAILABLE = [version for version in PYTHONS if shutil.which(f"python{version}")] or None
TEST_DEPS = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"]


BACKENDS = ["asyncio", "uvloop", "trio"]
HOSTS = ["thread", "process"]  # the Ray host has a session of its own: ray


@nox.session(python=AVAILABLE)
@nox.parametrize(
    ["backend", "host"],
    [(backend, host) for backend in BACKENDS for host in HOSTS],
    ids=[f"{backend}-{host}" for backend in BACKENDS for host in HOSTS],
)
def tests(session: nox.Session, backend: str, host: str) -> None:
    """The suite on one backend and host (pytest --backend B --host H)."""
    # The asyncio sessions install no trio at all.
    extras = {"asyncio": "", "uvloop": "[uvloop]", "trio": "[trio]"}[backend]
    session.install(f".{extras}", *TEST_DEPS)
    session.run("pytest", "--backend", backend, "--host", host, *session.posargs)


@nox.session
def ray(session: nox.Session) -> None:
    """Every test on the Ray host: its own module, and the shared modules on Ray
    (``--host ray``), on asyncio, uvloop and trio, against one local Ray runtime."""
    session.install(".[trio,uvloop,ray]", *TEST_DEPS)
    session.run("pytest", "-m", "ray", "--host", "ray", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(".[trio,uvloop]", "mypy", "pyright", *TEST_DEPS)
    session.run("mypy")
    session.run("pyright")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmark; it rewrites the README's Performance table and the chart."""
    session.install(".[trio,uvloop]", "matplotlib", "aiomultiprocess")
    session.run("python", "-m", "bench", *session.posargs)


# -- documentation, examples, typing, lowest versions ----------------------------------


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/; a broken reference or link fails it."""
    # mkdocstrings formats the signatures with Ruff when it is installed.
    session.install(".[docs]", "ruff")
    session.run("mkdocs", "build", "--strict", *session.posargs)


CHROMIUM = "/usr/bin/chromium"


@nox.session
def docs_browser(session: nox.Session) -> None:
    """Render the home and API pages in headless Chromium; save docs/_screenshots/*.png."""
    if not os.path.exists(CHROMIUM):
        session.error(
            f"{CHROMIUM} not found: install Debian's Chromium first, as root: "
            "apt-get update && apt-get install -y chromium"
        )
    session.install(".[docs]", "ruff")
    session.run("python", "docs/_check_browser.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example, the web ones included (httpx, hypercorn, Flask), on both backends."""
    session.install(".[trio,uvloop,examples]", *TEST_DEPS)
    session.run("pytest", "tests/test_examples.py", "tests/test_examples_web.py", *session.posargs)


@nox.session
def verifytypes(session: nox.Session) -> None:
    """Check that the public API is completely typed, as a user's type checker sees it."""
    # A regular (not editable) install: --verifytypes looks for the package in the
    # environment's site-packages.
    session.install(".[trio,uvloop]", "pyright")
    session.run("pyright", "--verifytypes", "portal_pool", "--ignoreexternal")


def _lower_bounds() -> dict[str, str]:
    """The ``>=`` bound of anyio, trio and uvloop in pyproject.toml, the one source of them."""
    text = Path("pyproject.toml").read_text(encoding="utf-8")
    bounds = dict(re.findall(r'"(anyio|trio|uvloop)>=([0-9][0-9.]*)', text))
    missing = {"anyio", "trio", "uvloop"} - set(bounds)
    if missing:
        raise RuntimeError(f"no lower bound found in pyproject.toml for {sorted(missing)}")
    return bounds


def _runs(program: str) -> bool:
    """Whether ``program --version`` works: a pyenv shim exists even when it cannot run."""
    path = shutil.which(program)
    if path is None:
        return False
    result = subprocess.run([path, "--version"], capture_output=True, check=False)
    return result.returncode == 0


# The oldest Python the project supports where this machine can run it, else nox's own.
LOWEST_PYTHON = PYTHONS[0] if _runs(f"python{PYTHONS[0]}") else None


@nox.session(python=LOWEST_PYTHON)
def lowest(session: nox.Session) -> None:
    """Run the suite against the lowest anyio, trio and uvloop that pyproject.toml allows."""
    pins = [f"{name}=={version}" for name, version in sorted(_lower_bounds().items())]
    session.install(".[trio,uvloop]", *TEST_DEPS, *pins)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("pytest", *session.posargs)
