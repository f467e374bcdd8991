"""MkDocs hooks: show parts of the README on the site, read at build time.

- ``<!-- readme:bench -->`` in a page becomes the README's benchmark block. ``python -m
  bench`` rewrites the README between ``<!-- bench:start -->`` and ``<!-- bench:end -->``
  and redraws ``bench/results/throughput.png``, which is copied into the site as
  ``img/throughput.png``.
- ``<!-- readme:section NAME -->`` becomes the body of the README's ``## NAME`` section.
  Links to anchors of the README itself lose their target (they would point nowhere on
  the site) and keep their text; links to ``docs/PAGE.md`` become links to ``PAGE.md``.

So the site never disagrees with the README. A README without the markers or the section,
or a missing chart, fails the build instead of publishing an empty page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CHART = ROOT / "bench" / "results" / "throughput.png"
CHART_IN_README = "bench/results/throughput.png"
CHART_IN_SITE = "img/throughput.png"
PLACEHOLDER = "<!-- readme:bench -->"
BENCH_BLOCK = re.compile(r"<!-- bench:start -->\n(.*?)<!-- bench:end -->", re.DOTALL)
SECTION_PLACEHOLDER = re.compile(r"<!-- readme:section (.+?) -->")
README_ANCHOR_LINK = re.compile(r"\[([^\]]+)\]\(#[^)]*\)")
# A README link to a page of the site, ``(docs/hosts.md)``: on the site the page is a sibling.
README_DOCS_LINK = re.compile(r"\]\(docs/")


def readme_bench_block() -> str:
    """The README's benchmark block, with the chart's path as the site has it."""
    match = BENCH_BLOCK.search(README.read_text(encoding="utf-8"))
    if match is None:
        raise PluginError(f"{README} has no <!-- bench:start --> ... <!-- bench:end --> block")
    return match[1].replace(CHART_IN_README, CHART_IN_SITE)


def readme_section(title: str) -> str:
    """The body of the README's ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise PluginError(f"{README} has no '## {title}' section")
    body = README_DOCS_LINK.sub("](", README_ANCHOR_LINK.sub(r"\1", match[1]))
    return body.strip() + "\n"


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    if not CHART.is_file():
        raise PluginError(f"the benchmark chart {CHART} is missing; run python -m bench")
    files.append(File.generated(config, CHART_IN_SITE, abs_src_path=str(CHART)))
    return files


def on_page_markdown(
    markdown: str, page: Page, config: MkDocsConfig, files: Files, **kwargs: Any
) -> str:
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, readme_bench_block())
    return SECTION_PLACEHOLDER.sub(lambda match: readme_section(match[1]), markdown)
