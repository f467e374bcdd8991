"""The examples and ``python -m portal_pool``, each run as a program in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import portal_pool.__main__ as cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Seconds one program may take; each needs well under two.
PROGRAM_TIMEOUT = 30

# Short enough for a quick suite, long enough that running the tasks of a loop one after
# another (DELAY * TASKS_PER_WORKER) could not pass for running them at the same time.
DELAY = 0.3
TASKS_PER_WORKER = 5


def run_program(*args: str, timeout: float = PROGRAM_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``python -W error ARGS`` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, "-W", "error", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """Check that the program exited cleanly, with no warning, and return its output."""
    assert result.returncode == 0, result.stderr
    # Under -W error an unclosed socket or stream shows up here, not in the exit status.
    assert result.stderr == ""
    return result.stdout


@pytest.fixture(params=["asyncio", "trio"])
def loop_backend(request: pytest.FixtureRequest) -> str:
    """The backend of the program's pool; trio variants are skipped without trio."""
    if request.param == "trio":
        pytest.importorskip("trio")
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop", "trio"])
def seed_flags(request: pytest.FixtureRequest) -> list[str]:
    """Command-line flags selecting the seed scenario's loops."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
        return ["--uvloop"]
    pytest.importorskip(request.param)
    return ["--backend", str(request.param)]


def check_seed_output(output: str, workers: int) -> None:
    """Check the results, in worker order, and that the tasks of a loop overlapped."""
    *results, last = output.splitlines()
    assert results == [
        f"return value from portal_pool-{index}"
        for index in range(workers)
        for _ in range(TASKS_PER_WORKER)
    ]
    match = re.fullmatch(r"elapsed: (\d+\.\d\d) s", last)
    assert match is not None, last
    elapsed = float(match[1])
    assert elapsed >= DELAY - 0.005  # printed rounded to 10 ms
    assert elapsed < DELAY * TASKS_PER_WORKER


def seed_arguments(workers: int) -> list[str]:
    return [
        "--workers",
        str(workers),
        "--tasks-per-worker",
        str(TASKS_PER_WORKER),
        "--delay",
        str(DELAY),
    ]


def test_seed_example(seed_flags: list[str]) -> None:
    result = run_program(str(EXAMPLES / "seed_three_loops.py"), *seed_flags, *seed_arguments(3))
    check_seed_output(succeeded(result), workers=3)


def test_python_m_portal_pool_runs_the_seed(seed_flags: list[str]) -> None:
    result = run_program("-m", "portal_pool", *seed_flags, *seed_arguments(2))
    check_seed_output(succeeded(result), workers=2)


def test_python_m_portal_pool_help() -> None:
    output = succeeded(run_program("-m", "portal_pool", "--help"))
    assert output.startswith("usage: python -m portal_pool")
    for option in ("--backend", "--workers", "--uvloop", "--delay", "bench"):
        assert option in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--uvloop", "--backend", "trio"], "--uvloop needs --backend asyncio"),
        (["--workers", "0"], "expected a whole number >= 1, got '0'"),
        (["--delay", "nan"], "expected a number of seconds >= 0, got 'nan'"),
        (["--nonsense"], "unrecognized arguments: --nonsense"),
        (["--workers", "2", "bench"], "options before 'bench'"),
    ],
)
def test_python_m_portal_pool_rejects_bad_options(arguments: list[str], message: str) -> None:
    result = run_program("-m", "portal_pool", *arguments)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.fixture
def fake_bench(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Install a stand-in ``bench.run`` whose ``main`` records its arguments."""
    calls: list[list[str]] = []

    def main(argv: list[str]) -> int:
        calls.append(argv)
        return 7

    run = types.ModuleType("bench.run")
    run.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench", types.ModuleType("bench"))
    monkeypatch.setitem(sys.modules, "bench.run", run)
    return calls


def test_bench_subcommand_hands_every_following_argument_to_the_benchmark(
    fake_bench: list[list[str]],
) -> None:
    assert cli.main(["bench", "--help", "--workers", "2", "out.csv"]) == 7
    assert fake_bench == [["--help", "--workers", "2", "out.csv"]]


def test_bench_subcommand_outside_a_source_checkout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes the import fail as if there were no such package.
    monkeypatch.setitem(sys.modules, "bench", None)
    monkeypatch.delitem(sys.modules, "bench.run", raising=False)
    assert cli.main(["bench"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "source checkout" in captured.err
    assert "pip install -e '.[trio,uvloop]' matplotlib" in captured.err


def test_bench_subcommand_with_a_dependency_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def import_module(name: str) -> types.ModuleType:
        # What importing bench.run raises when, say, matplotlib is not installed.
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "importlib", types.SimpleNamespace(import_module=import_module))
    assert cli.main(["bench"]) == 2
    assert "The benchmark needs matplotlib" in capsys.readouterr().err


def test_worker_resources_example(loop_backend: str) -> None:
    result = run_program(
        str(EXAMPLES / "worker_resources.py"), "--backend", loop_backend, "--tasks", "12"
    )
    lines = succeeded(result).splitlines()
    assert lines[0] == f"backend: {loop_backend}, 3 workers, 12 tasks"
    assert "connections opened: 3, by loop-0, loop-1, loop-2" in lines
    assert "tasks per connection: loop-0: 4, loop-1: 4, loop-2: 4" in lines
    assert "every task used its own loop's connection: yes" in lines
    assert (
        "use from another loop: refused (connection opened in loop-0 used from MainThread)" in lines
    )
    assert "connections closed while the pool ran: 0" in lines
    assert "connections closed at shutdown: 3" in lines
    assert lines[-1] == "all checks passed"


def test_trio_uses_asyncio_example() -> None:
    pytest.importorskip("trio")
    result = run_program(
        str(EXAMPLES / "trio_uses_asyncio.py"), "--rounds", "4", "--timeout", "0.25"
    )
    lines = succeeded(result).splitlines()
    assert re.fullmatch(r"trio program in MainThread; echo server on 127\.0\.0\.1:\d+", lines[0])
    echoes = [line for line in lines if line.startswith("echo ")]
    assert echoes == [
        f"echo {index}: sent 'hello {index} from trio', got 'hello {index} from trio' "
        f"(asyncio streams in portal_pool-0)"
        for index in range(4)
    ]
    cancelled = re.fullmatch(r"no-reply call: cancelled by trio after (\d+\.\d\d) s", lines[-3])
    assert cancelled is not None, lines[-3]
    assert float(cancelled[1]) >= 0.25 - 0.005  # printed rounded to 10 ms
    assert lines[-2] == "asyncio side: asyncio.CancelledError raised in the task; finally ran"
    assert lines[-1] == "all checks passed"
