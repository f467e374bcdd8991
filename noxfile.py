"""Sessions: tests per backend and Python, uvloop, lint, typecheck, bench."""

from __future__ import annotations

import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# Only the interpreters this machine has: nox would otherwise fail on a missing one.
AVAILABLE = [version for version in PYTHONS if shutil.which(f"python{version}")] or None
TEST_DEPS = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"]


@nox.session(python=AVAILABLE)
@nox.parametrize("backend", ["asyncio", "uvloop", "trio"])
def tests(session: nox.Session, backend: str) -> None:
    """Run the suite on one backend. The asyncio session installs no trio at all."""
    extras = {"asyncio": "", "uvloop": "[uvloop]", "trio": "[trio]"}[backend]
    session.install(f".{extras}", *TEST_DEPS)
    session.run("pytest", "--backend", backend, *session.posargs)


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
    session.install(".[trio,uvloop]", "matplotlib")
    session.run("python", "-m", "bench", *session.posargs)
