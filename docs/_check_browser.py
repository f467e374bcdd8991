"""Check the built documentation site in a real browser: headless Chromium from Debian.

Builds the site (``mkdocs build --strict``), serves it with ``python -m http.server`` on
127.0.0.1 and a free port, and for the home page and the API page:

- takes a screenshot (``docs/_screenshots/home.png`` and ``api.png`` by default);
- dumps the DOM as Chromium rendered it, and checks that the Material theme and the
  page's content are there (on the API page, an entry for every name in ``__all__``);
- checks in the server's log that the browser fetched the theme's stylesheet and script
  from the local server, and that nothing it asked for was missing.

Run by ``nox -s docs_browser``; needs ``/usr/bin/chromium`` (``apt-get install -y
chromium``). Nothing is fetched from the network: Chromium runs with background
networking off, and the site has no remote fonts or scripts. Look at the screenshots
afterwards: the checks above show the pages rendered, the pictures show how.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y chromium"
PAGES = {"home": "", "api": "api/"}
BROWSER_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_server(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, check=False
    )


def check_dom(name: str, dom: str) -> list[str]:
    """What is wrong with the rendered DOM of page ``name``; empty if nothing."""
    problems = []
    for marker, meaning in [
        ('class="md-header', "the Material header"),
        ('class="md-nav', "the navigation"),
        ('class="md-content', "the content area"),
        ("assets/stylesheets/main.", "the theme's stylesheet link"),
    ]:
        if marker not in dom:
            problems.append(f"{name}: {meaning} ({marker!r}) is missing from the DOM")
    if name == "home" and "A pool of worker threads" not in dom:
        problems.append("home: the introduction is missing")
    if name == "api":
        sys.path.insert(0, str(ROOT))
        import portal_pool

        for public in portal_pool.__all__:
            if f'id="portal_pool.{public}"' not in dom:
                problems.append(f"api: no entry for portal_pool.{public}")
        if 'class="doc doc-heading"' not in dom:
            problems.append("api: no mkdocstrings headings")
    return problems


def check_server_log(log: str) -> list[str]:
    """The browser must have loaded the theme's CSS and JS, and found everything."""
    problems = []
    requests = re.findall(r'"GET (\S+) HTTP/[\d.]+" (\d{3})', log)
    if not requests:
        return ["the server saw no request at all"]
    fetched = {path for path, status in requests if status in ("200", "304")}
    if not any(re.search(r"/assets/stylesheets/main\.[^/]*\.css$", p) for p in fetched):
        problems.append("the browser did not fetch the theme's stylesheet")
    if not any(re.search(r"/assets/javascripts/bundle\.[^/]*\.js$", p) for p in fetched):
        problems.append("the browser did not fetch the theme's script")
    missing = sorted({path for path, status in requests if status == "404"})
    # Chromium asks for /favicon.ico on its own; the theme's favicon is elsewhere.
    missing = [path for path in missing if path != "/favicon.ico"]
    if missing:
        problems.append(f"not found on the server: {missing}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "_screenshots",
        help="where the screenshots go (default: docs/_screenshots)",
    )
    parser.add_argument(
        "--site", type=Path, help="an already-built site to serve instead of building one"
    )
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} not found; install Debian's Chromium with: {INSTALL}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="portal_pool-docs-") as scratch:
        work = Path(scratch)
        site = args.site
        if site is None:
            site = work / "site"
            subprocess.run(
                [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                cwd=ROOT,
                check=True,
            )
        port = free_port()
        log_path = work / "server.log"
        with log_path.open("w") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                cwd=site,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_for_server(port)
                problems = take_screenshots(port, work, args.out)
            finally:
                server.terminate()
                server.wait(timeout=10)
        problems += check_server_log(log_path.read_text())

    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        return 1
    print("the home page and the API page rendered in Chromium; look at the screenshots")
    return 0


def take_screenshots(port: int, work: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for name, path in PAGES.items():
        url = f"http://127.0.0.1:{port}/{path}"
        profile = work / f"profile-{name}"
        shot = out / f"{name}.png"
        shot.unlink(missing_ok=True)
        result = chromium(profile, f"--screenshot={shot}", "--window-size=1280,1600", url)
        if result.returncode != 0 or not shot.is_file():
            problems.append(f"{name}: no screenshot (exit {result.returncode}): {result.stderr}")
            continue
        size = shot.stat().st_size
        print(f"{name}: {url} -> {shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}")
        print(f"  {size:,} bytes")
        # A blank or unstyled page compresses to a few kilobytes.
        if size < 20_000:
            problems.append(f"{name}: the screenshot is suspiciously small ({size} bytes)")
        dom = chromium(profile, "--dump-dom", url)
        if dom.returncode != 0:
            problems.append(f"{name}: --dump-dom failed: {dom.stderr}")
            continue
        problems += check_dom(name, dom.stdout)
    shutil.rmtree(work / "profile-home", ignore_errors=True)
    return problems


if __name__ == "__main__":
    sys.exit(main())
