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

# Free-threaded builds, and where ../shared/tools/build-freethreaded-python.sh installs them
# when they are not on PATH.
FREE_THREADED = {
    "3.13t": "/opt/cpython-3.13t/bin/python3.13t",
    "3.14t": "/opt/cpython-3.14t/bin/python3.14t",
}
# A directory on PATH holding only links to those: their own bin/ also has a python3 and
# a python3.13 (free-threaded too) that would shadow the normal builds if it were on PATH.
FREE_THREADED_BIN = Path(".nox", "free-threaded-bin")


def _free_threaded_pythons() -> list[str]:
    """The free-threaded interpreters found, put on PATH for nox to find by version."""
    found = []
    for version, installed in FREE_THREADED.items():
        program = f"python{version}"
        if shutil.which(program) is None and os.access(installed, os.X_OK):
            FREE_THREADED_BIN.mkdir(parents=True, exist_ok=True)
            link = FREE_THREADED_BIN / program
            if not link.is_symlink():
                link.symlink_to(installed)
            os.environ["PATH"] += os.pathsep + str(FREE_THREADED_BIN.resolve())
        if shutil.which(program) is not None:
            found.append(version)
    return found


FREE_THREADED_AVAILABLE = _free_threaded_pythons()
# Fails the run if the GIL is on once these are imported (see the tests session).
GIL_CHECK = (
    "import importlib.util, sys; import portal_pool, anyio; "
    "importlib.util.find_spec('trio') and __import__('trio'); "
    "sys.exit('the GIL is enabled' if sys._is_gil_enabled() else 0)"
)


BACKENDS = ["asyncio", "uvloop", "trio"]
HOSTS = ["thread", "process"]  # the Ray host has a session of its own: ray


@nox.session(python=[*(AVAILABLE or []), *FREE_THREADED_AVAILABLE] or None)
@nox.parametrize(
    ["backend", "host"],
    [(backend, host) for backend in BACKENDS for host in HOSTS],
    ids=[f"{backend}-{host}" for backend in BACKENDS for host in HOSTS],
)
def tests(session: nox.Session, backend: str, host: str) -> None:
    """The suite on one backend and host (pytest --backend B --host H).

    On a free-threaded build (3.13t, 3.14t) with the GIL off; uvloop is skipped there.
    """
    free_threaded = str(session.python).endswith("t")
    if free_threaded and backend == "uvloop":
        session.skip("uvloop has no free-threaded build (it would turn the GIL back on)")
    # The asyncio sessions install no trio at all.
    extras = {"asyncio": "", "uvloop": "[uvloop]", "trio": "[trio]"}[backend]
    # --prefer-binary: hypothesis 6.156 and later is a Rust extension with no cp313t wheel;
    # 6.155.7, the last pure-Python release, is within the >=6.100 allowed.
    session.install(f".{extras}", *TEST_DEPS, *(["--prefer-binary"] if free_threaded else []))
    env = {}
    if free_threaded:
        # First without PYTHON_GIL (an empty value is unset): no import may turn the GIL
        # back on by itself. Then the suite with it off, and the conftest checks that it
        # stayed off (PORTAL_POOL_REQUIRE_NO_GIL).
        session.run("python", "-c", GIL_CHECK, env={"PYTHON_GIL": ""})
        env = {"PYTHON_GIL": "0", "PORTAL_POOL_REQUIRE_NO_GIL": "1"}
    session.run("pytest", "--backend", backend, "--host", host, *session.posargs, env=env)


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
