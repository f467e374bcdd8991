"""The process host only: its API, a child that dies, a parent that dies, Ctrl-C, and
calls that go by value (lambdas, closures, functions of ``__main__``).

The whole-process cases run a ``python -c`` script in a subprocess, whose own children
are the worker processes: the test reads their pids and the lines they print, and
checks through ``/proc`` that they are gone (a zombie counts as gone: it has exited, and
waits only for init to reap it, which happens to the children of a SIGKILLed parent).
"""

from __future__ import annotations

import functools
import glob
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from portal_pool import BrokenPortalPool, PortalPool, ProcessHost, ThreadHost, current_worker

from .conftest import POOL_BACKENDS, _selected

# Process-only: `--host thread` deselects the module, and `shared` gives manager proxies.
HOSTS = ("process",)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; POSIX signals"
)

# A dead child's in-flight futures fail within this long of its death (the contract).
# Measured here: 2-5 ms from the kill to the last failure, so a 20x margin.
FAILURE_DEADLINE = 0.1
# A SIGKILLed parent's children exit within this long (the contract). Measured: ~30 ms,
# or 1.5 s and ~10 ms when a task ignores cancellation (the children's grace period).
ORPHAN_DEADLINE = 2.0
# After Ctrl-C, the parent cancels the work and exits within this long. Measured: 50-70 ms.
CTRL_C_DEADLINE = 1.0
# After a second Ctrl-C at exit, the children are terminated within this long.
TERMINATE_DEADLINE = 0.5


# -- tasks: module-level, so they go by reference ---------------------------------------


def getpid() -> int:
    return os.getpid()


async def hold(started: Any, tag: str) -> None:
    """Say it has started, then wait until cancelled or its process dies."""
    started.append(tag)
    await anyio.sleep(3600)


async def exit_when(started: Any, tag: str, trigger: Any, exits: Any) -> None:
    """Say it has started; once ``trigger`` is set, end this process with status 3."""
    started.append(tag)
    await anyio.to_thread.run_sync(trigger.wait, abandon_on_cancel=True)
    exits.append(time.monotonic())  # CLOCK_MONOTONIC: the same clock in every process
    os._exit(3)


async def pid_after(started: Any, tag: str, release: Any) -> int:
    """Say it has started; once ``release`` is set, return this process's pid."""
    started.append(tag)
    await anyio.to_thread.run_sync(release.wait, abandon_on_cancel=True)
    return os.getpid()


def pid_and_context() -> tuple[int, Any]:
    return os.getpid(), current_worker().context


class CountingContext:
    """A ``worker_context`` recording each entry's worker index in a shared list, and
    yielding how many times that worker has entered it; picklable, to reach the child.

    With ``once``, a worker's second entry fails: its replacement cannot start."""

    def __init__(self, entries: Any, once: bool = False) -> None:
        self.entries = entries
        self.once = once

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[int]:
        index = current_worker().index
        self.entries.append(index)
        count = self.entries[:].count(index)
        if self.once and count > 1:
            raise ConnectionError(f"worker {index} cannot reconnect")
        yield count


# -- helpers ----------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (``"Z"`` for a zombie), ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie has)."""
    return process_state(pid) not in (None, "Z", "X")


def kill_if_worker(pid: int) -> None:
    """SIGKILL ``pid`` if it still runs a multiprocessing child (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if running(pid) and b"multiprocessing" in cmdline.read():
                os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def wait_gone(pids: list[int], seconds: float) -> float:
    """Wait until none of ``pids`` runs; return how long that took. On a timeout, kill
    what is left (so later tests are not disturbed) and fail."""
    started = time.monotonic()
    deadline = started + seconds
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            left = [pid for pid in pids if running(pid)]
            for pid in left:
                kill_if_worker(pid)
            pytest.fail(f"processes still running after {seconds} s: {left}")
        time.sleep(0.005)
    return time.monotonic() - started


def ignores_sigint(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError(f"no SigIgn line for pid {pid}")


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (of all its threads), from /proc."""
    children: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as listing:
            children += [int(child) for child in listing.read().split()]
    return children


# Every script: a hang dumps its stacks and exits, so the test reads EOF, not forever;
# `say` prints a line in one unbuffered write (worker processes print on the same pipe).
PRELUDE = """
import faulthandler, os, signal, sys
faulthandler.dump_traceback_later(20, exit=True)
signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the test runner left
import anyio
from portal_pool import PortalPool
backend, options = sys.argv[1], eval(sys.argv[2])

def say(*parts):
    os.write(1, (" ".join(map(str, parts)) + "\\n").encode())
"""


class Script:
    """A ``python -c`` script, with its stdout read line by line."""

    def __init__(self, body: str, backend_kwargs: dict[str, Any], *args: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PRELUDE + textwrap.dedent(body),
                str(backend_kwargs["backend"]),
                repr(backend_kwargs["backend_options"]),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,  # its own process group, as a terminal gives a job
        )
        self.worker_pids: list[int] = []

    def read(self, expected: dict[str, int]) -> list[str]:
        """Read lines until each prefix in ``expected`` has been seen that many times
        (in any order: the parent and its children write concurrently). A ``pids``
        line sets ``worker_pids``."""
        assert self.process.stdout is not None
        counts = dict.fromkeys(expected, 0)
        lines: list[str] = []
        while counts != expected:
            line = self.process.stdout.readline()
            if not line:
                self.process.kill()
                _, stderr = self.process.communicate()
                pytest.fail(f"the script ended early after {lines}:\n{stderr}")
            lines.append(line.strip())
            word = line.split()[0]
            assert word in counts, f"unexpected line {line!r} after {lines}"
            counts[word] += 1
            if word == "pids":
                self.worker_pids = [int(pid) for pid in line.split()[1:]]
        return lines

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def close(self) -> None:
        # The workers first: while one runs, it holds the pipes that communicate() reads.
        self.process.kill()
        for pid in self.worker_pids:
            kill_if_worker(pid)
        self.process.communicate()


@pytest.fixture
def script(backend_kwargs: dict[str, Any]) -> Iterator[Any]:
    scripts: list[Script] = []

    def start(body: str, *args: str) -> Script:
        scripts.append(Script(body, backend_kwargs, *args))
        return scripts[-1]

    yield start
    for each in scripts:
        each.close()


@pytest.fixture(scope="module", params=list(POOL_BACKENDS))
def shared_pool(request: pytest.FixtureRequest) -> Iterator[PortalPool[Any]]:
    """A two-worker process pool per backend, for the tests that do not need their own.

    Its thread name prefix is not ``portal_pool``: the leak checks would take its
    processes, alive from test to test, for leaks."""
    if request.param not in _selected(request.config):
        pytest.skip(f"backend {request.param} not selected or not installed")
    if "process" not in (request.config.getoption("--host") or ("process",)):
        pytest.skip("the process host is not selected")
    backend, options, _ = POOL_BACKENDS[request.param]
    with PortalPool(
        2, backend=backend, backend_options=options, host="process", thread_name_prefix="shared"
    ) as pool:
        yield pool


# -- 1. API -----------------------------------------------------------------------------


def test_pool_host_and_worker_pids(shared_pool: PortalPool[Any]) -> None:
    assert isinstance(shared_pool.host, ProcessHost)
    assert shared_pool.host.mp_context.get_start_method() == "forkserver"  # host="process"
    pids = [worker.pid for worker in shared_pool.workers]
    assert os.getpid() not in pids
    assert len(set(pids)) == 2
    # Each worker's pid is the process that runs its tasks.
    assert [worker.run(getpid) for worker in shared_pool.workers] == pids


def test_worker_pid_is_the_parents_on_the_thread_host() -> None:
    with PortalPool(2, host="thread") as pool:
        assert isinstance(pool.host, ThreadHost)
        assert [worker.pid for worker in pool.workers] == [os.getpid()] * 2
        assert pool.run(getpid) == os.getpid()


def test_an_unknown_host_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'thread'.*'process'") as raised:
        PortalPool(1, host="nope")
    assert "'nope'" in str(raised.value)


@pytest.mark.parametrize(
    "context", ["fork", multiprocessing.get_context("fork")], ids=["name", "context"]
)
def test_fork_is_refused_saying_why(context: Any) -> None:
    with pytest.raises(
        ValueError, match="cannot use the 'fork' start method: the parent runs threads"
    ):
        ProcessHost(context)


def test_the_parent_starts_no_watchdog_thread_for_worker_processes() -> None:
    # Each worker process watches its own loop and reports to the parent's log (see
    # test_watchdog.py): a thread here would only wake up for nothing.
    with PortalPool(1, host="process", stall_timeout=5, thread_name_prefix="nowatch") as pool:
        assert pool.run(os.getpid) == pool.workers[0].pid
        names = [thread.name for thread in threading.enumerate()]
        assert "nowatch-0" in names  # the link thread: the prefix is used here
        assert "nowatch-watchdog" not in names


def test_the_default_start_method_is_forkserver_on_linux() -> None:
    assert ProcessHost().mp_context.get_start_method() == "forkserver"
    assert repr(ProcessHost()) == "ProcessHost(mp_context='forkserver')"


def test_spawn_works_end_to_end(backend_kwargs: dict[str, Any], shared: Any) -> None:
    host = ProcessHost("spawn")
    assert host.mp_context.get_start_method() == "spawn"
    entries = shared.list()
    with PortalPool(
        2, worker_context=CountingContext(entries), **{**backend_kwargs, "host": host}
    ) as pool:
        assert pool.host is host
        results = [worker.run(pid_and_context) for worker in pool.workers]
        assert results == [(worker.pid, 1) for worker in pool.workers]
        assert os.getpid() not in [pid for pid, _ in results]
        assert list(pool.map(abs, range(-3, 0))) == [3, 2, 1]
        assert pool.submit(lambda: current_worker().index).result(timeout=10) in (0, 1)
    assert sorted(entries) == [0, 1]


# -- 2. a child that dies ---------------------------------------------------------------


def settle_times(futures: list[Future[Any]]) -> list[float]:
    """When each future settles, appended by its done callback (in the link thread)."""
    times: list[float] = []
    for future in futures:
        future.add_done_callback(lambda _: times.append(time.monotonic()))
    return times


@pytest.mark.parametrize("death", ["sigkill", "exit_3"])
def test_a_dead_child_fails_only_its_in_flight_work_and_is_replaced(
    backend_kwargs: dict[str, Any], shared: Any, caplog: pytest.LogCaptureFixture, death: str
) -> None:
    caplog.set_level(logging.WARNING, logger="portal_pool")
    started, entries = shared.list(), shared.list()
    trigger, release = shared.Event(), shared.Event()
    exits = shared.list()
    with PortalPool(
        2, max_concurrency=2, worker_context=CountingContext(entries), **backend_kwargs
    ) as pool:
        doomed, other = pool.workers
        doomed_pid, other_pid = doomed.pid, other.pid
        # Two calls in flight in the doomed child; with max_concurrency=2, two more wait
        # in the parent, unsent. One call in flight in the other child.
        if death == "sigkill":
            in_flight = [doomed.submit(hold, started, "a"), doomed.submit(hold, started, "b")]
        else:
            in_flight = [
                doomed.submit(hold, started, "a"),
                doomed.submit(exit_when, started, "b", trigger, exits),
            ]
        unsent = [doomed.submit(pid_and_context) for _ in range(2)]
        untouched = other.submit(pid_after, started, "c", release)
        failed_at = settle_times(in_flight)
        deadline = time.monotonic() + 10
        while len(started) < 3:
            assert time.monotonic() < deadline, f"only {started[:]} started"
            time.sleep(0.005)
        stats = pool.stats().workers[0]
        assert (stats.running, stats.queued) == (2, 2)

        if death == "sigkill":
            died_at = time.monotonic()
            os.kill(doomed_pid, signal.SIGKILL)
        else:
            trigger.set()
        for future in in_flight:
            with pytest.raises(BrokenPortalPool) as raised:
                future.result(timeout=10)
            how = "was killed by SIGKILL" if death == "sigkill" else "exited with code 3"
            assert str(raised.value) == (
                f"worker 0's process (pid {doomed_pid}) {how} while it ran this call"
            )
        if death == "exit_3":
            [died_at] = exits[:]
        assert not untouched.done()
        # The contract: within 100 ms of the death (measured: a few ms).
        elapsed = max(failed_at) - died_at
        assert 0 <= elapsed < FAILURE_DEADLINE, f"{elapsed * 1000:.1f} ms from death to failure"

        # The unsent calls ran on the replacement, whose worker_context was entered anew.
        results = [future.result(timeout=10) for future in unsent]
        replaced_pid = doomed.pid
        assert replaced_pid != doomed_pid
        assert results == [(replaced_pid, 2)] * 2
        assert sorted(entries) == [0, 0, 1]
        assert not running(doomed_pid)
        # The other worker's call was never disturbed.
        release.set()
        assert untouched.result(timeout=10) == other_pid == other.pid
        stats = pool.stats()
        assert stats.restarts == 1
        assert [worker.restarts for worker in stats.workers] == [1, 0]
        assert stats.failed == 2
        assert doomed.run(pid_and_context) == (replaced_pid, 2)
    how = "was killed by SIGKILL" if death == "sigkill" else "exited with code 3"
    assert [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "portal_pool"
    ] == [(logging.WARNING, f"worker 0's process {how}; starting another (restart 1)")]


def test_a_replacement_that_cannot_start_leaves_the_worker_broken(
    backend_kwargs: dict[str, Any], shared: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="portal_pool")
    started, entries = shared.list(), shared.list()
    with PortalPool(
        2, max_concurrency=1, worker_context=CountingContext(entries, once=True), **backend_kwargs
    ) as pool:
        doomed, other = pool.workers
        doomed_pid = doomed.pid
        in_flight = doomed.submit(hold, started, "a")
        unsent = [doomed.submit(getpid) for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(started) < 1:
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.005)
        os.kill(doomed_pid, signal.SIGKILL)
        with pytest.raises(BrokenPortalPool, match="killed by SIGKILL"):
            in_flight.result(timeout=10)
        # The replacement's worker_context fails: the work kept for it fails too.
        for future in unsent:
            with pytest.raises(BrokenPortalPool, match="worker 0's process has ended"):
                future.result(timeout=10)
        with pytest.raises(BrokenPortalPool, match="worker 0"):
            doomed.submit(getpid)
        # Both of worker 0's processes are gone, the replacement included.
        assert sorted(entries) == [0, 0, 1]
        assert not running(doomed_pid)
        assert not running(doomed.pid)
        assert [
            child.name
            for child in multiprocessing.active_children()
            if child.name == "portal_pool-0-process"
        ] == []
        # The other worker serves on.
        assert other.run(getpid) == other.pid
    records = [record for record in caplog.records if record.name == "portal_pool"]
    assert [(record.levelno, record.getMessage()) for record in records] == [
        (
            logging.WARNING,
            "worker 0's process was killed by SIGKILL; starting another (restart 1)",
        ),
        (
            logging.ERROR,
            "worker 0's process failed and its replacement could not start; the worker "
            "is broken: work sent to it fails with BrokenPortalPool",
        ),
    ]
    # Why the replacement could not start, as the thread host logs it.
    assert records[1].exc_info is not None
    cause = records[1].exc_info[1]
    assert isinstance(cause, ConnectionError)
    assert str(cause) == "worker 0 cannot reconnect"


# -- 3. a parent that dies --------------------------------------------------------------

PARENT_WORK = {
    # Work that ends when cancelled: the children exit as soon as they see the parent gone.
    "cancellable": """
async def work(i):
    say("running", i)
    await anyio.sleep(3600)
""",
    # Work whose clean-up never ends: the children give it a grace period, then exit.
    "stubborn": """
async def work(i):
    try:
        say("running", i)
        await anyio.sleep(3600)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(3600)
""",
}
START_WORK = """
pool = PortalPool(2, backend=backend, backend_options=options, host="process")
futures = [pool.submit(work, i) for i in range(4)]
say("pids", *[worker.pid for worker in pool.workers])
futures[0].result()
"""


@pytest.mark.parametrize("work", sorted(PARENT_WORK))
def test_a_sigkilled_parent_leaves_no_child(script: Any, work: str) -> None:
    parent = script(PARENT_WORK[work] + START_WORK)
    parent.read({"pids": 1, "running": 4})
    # The workers, and the parent's own children: the forkserver and resource tracker.
    pids = [*parent.worker_pids, *child_pids(parent.process.pid)]
    assert len(pids) == 4
    assert all(running(pid) for pid in pids)
    killed_at = time.monotonic()
    os.kill(parent.process.pid, signal.SIGKILL)
    parent.process.wait()
    # Measured: ~30 ms for cancellable work; for stubborn work, the children's 1.5 s
    # grace and ~10 ms.
    wait_gone(pids, ORPHAN_DEADLINE)
    elapsed = time.monotonic() - killed_at
    assert elapsed < ORPHAN_DEADLINE, f"children ran on for {elapsed:.2f} s"


# -- 4. Ctrl-C ---------------------------------------------------------------------------

# Four tasks that mark their `finally` in a file, say so, then hold their clean-up
# until the test has checked that their processes still run after the Ctrl-C.
MARKED_WORK = """
from concurrent.futures import wait
directory = sys.argv[3]

async def marked(i):
    try:
        say("running", i)
        await anyio.sleep(3600)
    finally:
        with open(os.path.join(directory, f"finally-{i}"), "w") as marker:
            marker.write(str(os.getpid()))
        say("finally", i)
        with anyio.CancelScope(shield=True):
            while not os.path.exists(os.path.join(directory, "release")):
                await anyio.sleep(0.005)

with PortalPool(2, backend=backend, backend_options=options, host="process") as pool:
    futures = [pool.submit(marked, i) for i in range(4)]
    say("pids", *[worker.pid for worker in pool.workers])
    wait(futures)
"""


def test_ctrl_c_to_the_process_group_cancels_the_work_and_exits(
    script: Any, tmp_path: Path
) -> None:
    parent = script(MARKED_WORK, str(tmp_path))
    parent.read({"pids": 1, "running": 4})
    pids = parent.worker_pids
    assert all(ignores_sigint(pid) for pid in pids)
    interrupted_at = time.monotonic()
    os.killpg(parent.process.pid, signal.SIGINT)  # as a terminal sends it: to all
    parent.read({"finally": 4})
    # The children ignored the Ctrl-C: they run the clean-up that the parent asked for.
    assert all(running(pid) for pid in pids)
    (tmp_path / "release").touch()
    parent.process.wait(timeout=10)
    elapsed = time.monotonic() - interrupted_at
    assert elapsed < CTRL_C_DEADLINE, f"exited {elapsed:.2f} s after Ctrl-C"
    assert parent.process.returncode == -signal.SIGINT
    assert parent.stderr().splitlines()[-1] == "KeyboardInterrupt"
    markers = sorted(path.name for path in tmp_path.glob("finally-*"))
    assert markers == [f"finally-{i}" for i in range(4)]
    assert {int((tmp_path / name).read_text()) for name in markers} == set(pids)
    # The parent waited for its children: none runs once it has exited.
    assert not any(running(pid) for pid in pids)


# Tasks whose clean-up never ends; the script ends without shutdown(), so the exit
# waits for them. announce_joins prints "joining" once that wait has begun.
STUBBORN_WORK = """
async def stubborn(i):
    try:
        say("running", i)
        await anyio.sleep(3600)
    finally:
        say("cleaning", i)
        with anyio.CancelScope(shield=True):
            await anyio.sleep(3600)

import portal_pool._lifecycle as lifecycle
ended = lifecycle.wait_done
said = []

def announcing(future):
    if not said:
        said.append(True)
        say("joining")
    return ended(future)

lifecycle.wait_done = announcing
pool = PortalPool(2, backend=backend, backend_options=options, host="process")
futures = [pool.submit(stubborn, i) for i in range(2)]
say("pids", *[worker.pid for worker in pool.workers])
"""


def test_a_second_ctrl_c_at_exit_ends_the_children(script: Any) -> None:
    parent = script(STUBBORN_WORK)
    parent.read({"pids": 1, "running": 2, "joining": 1})
    pids = parent.worker_pids
    os.killpg(parent.process.pid, signal.SIGINT)
    parent.read({"cleaning": 2})  # the first Ctrl-C cancelled the work
    assert all(running(pid) for pid in pids)
    interrupted_at = time.monotonic()
    os.killpg(parent.process.pid, signal.SIGINT)
    parent.process.wait(timeout=10)
    assert time.monotonic() - interrupted_at < CTRL_C_DEADLINE
    assert parent.process.returncode == -signal.SIGINT
    # Terminated by the parent (measured: ~5 ms), not left to end themselves once
    # orphaned, after the 1.5 s grace a task that ignores cancellation gets.
    wait_gone(pids, TERMINATE_DEADLINE)
    stderr = parent.stderr()
    assert stderr.splitlines()[-1].startswith("KeyboardInterrupt: portal_pool"), stderr


# -- 6. calls that go by value ------------------------------------------------------------


def scale(x: int, factor: int) -> int:
    return x * factor


def test_lambdas_closures_and_partials_run_in_the_children(shared_pool: PortalPool[Any]) -> None:
    offset = 10

    def add_offset(x: int) -> int:  # a closure: only by value
        return x + offset

    async def async_closure(x: int) -> tuple[int, int]:
        await anyio.sleep(0)
        return x + offset, os.getpid()

    pids = {worker.pid for worker in shared_pool.workers}
    assert shared_pool.submit(lambda x: (x * 2, os.getpid()), 4).result(timeout=10)[0] == 8
    assert shared_pool.submit(add_offset, 1).result(timeout=10) == 11
    value, pid = shared_pool.submit(async_closure, 2).result(timeout=10)
    assert (value, pid in pids) == (12, True)
    assert shared_pool.submit(functools.partial(scale, factor=3), 5).result(timeout=10) == 15
    assert shared_pool.submit(functools.partial(add_offset, 7)).result(timeout=10) == 17
    assert list(shared_pool.map(lambda x: x + offset, range(4), chunksize=2)) == [10, 11, 12, 13]
    # A lambda returned from a child comes back by value too.
    returned = shared_pool.submit(lambda: lambda y: y - 1).result(timeout=10)
    assert returned(5) == 4


# Everything here lives in __main__, which the children do not have: a `python -c`
# script has no file for them to import it from.
MAIN_DEFINED_WORK = """
import functools
from dataclasses import dataclass

@dataclass
class Point:
    x: int
    y: int

def square(x):
    return x * x

async def async_square(x):
    await anyio.sleep(0)
    return x * x, os.getpid()

def make_adder(n):
    def add(x):
        return x + n
    return add

offset = 100

with PortalPool(2, backend=backend, backend_options=options, host="process") as pool:
    pids = {worker.pid for worker in pool.workers}
    value, pid = pool.submit(async_square, 4).result(timeout=10)
    assert pid in pids and pid != os.getpid(), pid
    results = {
        "function": pool.submit(square, 3).result(timeout=10),
        "coroutine function": value,
        "lambda": pool.submit(lambda x: x + offset, 1).result(timeout=10),
        "closure": pool.submit(make_adder(10), 1).result(timeout=10),
        "partial": pool.submit(functools.partial(square, 6)).result(timeout=10),
        "partial of a closure": pool.submit(functools.partial(make_adder(1), 2)).result(timeout=10),
        "map": list(pool.map(lambda p: Point(p.y, p.x), [Point(1, 2), Point(3, 4)])),
        "class": pool.submit(Point, 5, y=6).result(timeout=10),
    }
    results["the same class"] = type(results["class"]) is Point
say(repr(results))
"""


def test_functions_defined_in_main_run_in_the_children(script: Any) -> None:
    parent = script(MAIN_DEFINED_WORK)
    stdout, stderr = parent.process.communicate(timeout=30)
    assert parent.process.returncode == 0, stderr
    assert stdout.splitlines() == [
        "{'function': 9, 'coroutine function': 16, 'lambda': 101, 'closure': 11, "
        "'partial': 36, 'partial of a closure': 3, "
        "'map': [Point(x=2, y=1), Point(x=4, y=3)], 'class': Point(x=5, y=6), "
        "'the same class': True}"
    ]
