"""Whole-process behaviour: Ctrl-C, interpreter exit. Each case runs in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import pytest

PRELUDE = """
import faulthandler, os, signal, sys, anyio
# As a program started from a terminal: a test run started with SIGINT ignored (in the
# background, by some CI launchers) passes that on, and Ctrl-C would test nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)
faulthandler.dump_traceback_later(8, exit=True)  # a hang shows its stacks, then exits
from portal_pool import PortalPool
backend, options = sys.argv[1], eval(sys.argv[2])

async def forever(*_):
    await anyio.sleep(3600)

async def slow_value(n):
    await anyio.sleep(0.2)
    return n

def say(line):
    # One unbuffered write: a Ctrl-C landing in a buffered flush can write a line twice,
    # and other threads print too.
    os.write(1, f"{line}\\n".encode())

import threading
stubborn_running = threading.Event()

async def stubborn(*_):
    # Cancelled, it cleans up for good: only a second Ctrl-C gets past it.
    stubborn_running.set()
    try:
        await anyio.sleep(3600)
    finally:
        say("cleaning up")
        with anyio.CancelScope(shield=True):
            await anyio.sleep(3600)

def announce_joins():
    # Print "joining" once portal_pool waits for a worker thread, so a signal sent
    # after that line lands in the wait, not before it.
    import portal_pool._lifecycle as pool_module
    ended = pool_module.wait_done
    said = []
    def announcing(future):
        if not said:
            said.append(True)  # first: the Ctrl-C may land as soon as the line is out
            say("joining")
        return ended(future)
    pool_module.wait_done = announcing

def print_result(future):
    print("done", future.result(), flush=True)
"""

SIGINT_SCENARIOS = {
    "with_block_result": """
with PortalPool(2, backend=backend, backend_options=options) as pool:
    future = pool.submit(forever)
    print("ready", flush=True)
    future.result()
""",
    "bare_result": """
pool = PortalPool(2, backend=backend, backend_options=options)
future = pool.submit(forever)
print("ready", flush=True)
future.result()
""",
    "map_waiting": """
pool = PortalPool(2, backend=backend, backend_options=options)
results = pool.map(forever, range(10))
print("ready", flush=True)
list(results)
""",
    "run_waiting": """
pool = PortalPool(2, backend=backend, backend_options=options)
print("ready", flush=True)
pool.run(forever)
""",
    "during_init": """
from contextlib import asynccontextmanager

@asynccontextmanager
async def slow_context():
    sys.stdout.write("ready\\n")  # one write: two workers print this concurrently
    sys.stdout.flush()
    await anyio.sleep(3600)
    yield

PortalPool(2, backend=backend, backend_options=options, worker_context=slow_context)
""",
}


def _spawn(
    body: str, backend_kwargs: dict[str, object], stdin: bool = False
) -> subprocess.Popen[str]:
    """Run PRELUDE and ``body``; with ``stdin``, then a REPL reading statements from it."""
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.Popen(
        [
            sys.executable,
            *(["-i"] if stdin else []),
            "-c",
            script,
            str(backend_kwargs["backend"]),
            repr(backend_kwargs["backend_options"]),
        ],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("scenario", sorted(SIGINT_SCENARIOS))
def test_ctrl_c_exits_promptly(backend_kwargs: dict[str, object], scenario: str) -> None:
    process = _spawn(SIGINT_SCENARIOS[scenario], backend_kwargs)
    assert process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "ready"
        interrupted_at = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        elapsed = time.monotonic() - interrupted_at
    finally:
        process.kill()
        process.wait()
    assert elapsed < 2.0, f"took {elapsed:.2f} s to exit after Ctrl-C:\n{stderr}"
    assert "KeyboardInterrupt" in stderr
    assert "Exception ignored" not in stderr
    assert process.returncode != 0


def test_interpreter_exit_finishes_submitted_work_silently(
    backend_kwargs: dict[str, object],
) -> None:
    body = """
pool = PortalPool(2, backend=backend, backend_options=options)
import threading
lock, finished = threading.Lock(), []

def report(future):
    with lock:
        finished.append(future.result())
        if len(finished) == 6:
            print("all done", sum(finished), flush=True)

for n in range(6):
    pool.submit(slow_value, n).add_done_callback(report)
# the script ends here, without shutdown()
"""
    process = _spawn(body, backend_kwargs)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert stderr == ""
    assert "all done 15" in stdout


def _sleeping(pid: int) -> bool:
    """Whether the process's main thread is blocked in a sleep, not about to enter one."""
    with open(f"/proc/{pid}/task/{pid}/wchan") as wchan:
        return wchan.read().strip() == "hrtimer_nanosleep"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/wchan")
def test_ctrl_c_reaches_a_main_thread_blocked_outside_the_pool(
    backend_kwargs: dict[str, object],
) -> None:
    # Worker threads no longer block signals, so the kernel could hand SIGINT to any of
    # them; a main thread blocked in a plain time.sleep() sees it only if it gets it.
    body = """
import time
pool = PortalPool(4, backend=backend, backend_options=options)
futures = [pool.submit(forever) for _ in range(8)]
print("ready", flush=True)
time.sleep(3600)
"""
    process = _spawn(body, backend_kwargs)
    assert process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "ready"
        # A signal sent before the sleep begins would be seen only when it ends: that
        # race is Python's own, so wait until the main thread is in the sleep.
        deadline = time.monotonic() + 10
        while not _sleeping(process.pid):
            assert time.monotonic() < deadline, "the main thread never went to sleep"
            time.sleep(0.01)
        interrupted_at = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        elapsed = time.monotonic() - interrupted_at
    finally:
        process.kill()
        process.wait()
    assert elapsed < 2.0, f"took {elapsed:.2f} s to exit after Ctrl-C:\n{stderr}"
    assert "KeyboardInterrupt" in stderr


class _Ended(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    elapsed: float  # from the last SIGINT, or the start, to the end of the process


def _interrupt(process: subprocess.Popen[str], *steps: set[str]) -> _Ended:
    """For each step, read its lines (in any order), then send SIGINT; wait for the end."""
    assert process.stdout is not None
    try:
        for lines in steps:
            seen = {process.stdout.readline().strip() for _ in lines}
            assert seen == lines
            interrupted_at = time.monotonic()
            os.kill(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
        return _Ended(process.returncode, stdout, stderr, time.monotonic() - interrupted_at)
    finally:
        process.kill()
        process.communicate()  # and close the pipes


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_the_exit_wait_ends_with_the_ctrl_c_status_and_one_line(
    backend_kwargs: dict[str, object],
) -> None:
    body = """
import atexit
atexit.register(print, "atexit handler ran", flush=True)
announce_joins()
pool = PortalPool(2, backend=backend, backend_options=options)
pool.submit(forever)
# the script ends here, without shutdown(): the exit waits for the work
"""
    ended = _interrupt(_spawn(body, backend_kwargs), {"joining"})
    assert ended.elapsed < 2.0
    # As after an uncaught KeyboardInterrupt: killed by SIGINT, which a shell shows as 130.
    assert ended.returncode == -signal.SIGINT
    assert len(ended.stderr.splitlines()) == 1, ended.stderr
    assert ended.stderr.startswith("KeyboardInterrupt")
    assert "atexit handler ran" in ended.stdout  # the clean-up finished: the exit goes on


SECOND_CTRL_C_SCENARIOS = {
    # The script ends normally: the first Ctrl-C cancels the work the exit waits for.
    "at_exit": """
import atexit
atexit.register(print, "atexit handler ran", flush=True)
announce_joins()
pool = PortalPool(1, backend=backend, backend_options=options)
pool.submit(stubborn)
stubborn_running.wait()
""",
    # The first Ctrl-C leaves the block, which cancels the work and waits for it.
    "with_block": """
import atexit
atexit.register(print, "atexit handler ran", flush=True)
with PortalPool(1, backend=backend, backend_options=options) as pool:
    future = pool.submit(stubborn)
    stubborn_running.wait()
    announce_joins()
    say("ready")
    future.result()
""",
    # The first Ctrl-C escapes the script: the exit cancels the work and waits for it.
    "uncaught": """
import atexit
atexit.register(print, "atexit handler ran", flush=True)
pool = PortalPool(1, backend=backend, backend_options=options)
future = pool.submit(stubborn)
stubborn_running.wait()
announce_joins()
say("ready")
future.result()
""",
    # From trio, the first Ctrl-C leaves `async with`, whose exit cancels and waits.
    "async_with_on_trio": """
import atexit
atexit.register(print, "atexit handler ran", flush=True)

async def main():
    async with PortalPool(1, backend=backend, backend_options=options) as pool:
        pool.submit(stubborn)
        await anyio.to_thread.run_sync(stubborn_running.wait)
        say("ready")
        await anyio.sleep(3600)

anyio.run(main, backend="trio")
""",
}
# The lines to read before each Ctrl-C: the second lands once the first has cancelled
# the work and portal_pool waits for its clean-up.
SECOND_CTRL_C_STEPS = {
    "at_exit": ({"joining"}, {"cleaning up"}),
    "with_block": ({"ready"}, {"cleaning up", "joining"}),
    "uncaught": ({"ready"}, {"cleaning up", "joining"}),
    "async_with_on_trio": ({"ready"}, {"cleaning up"}),
}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("scenario", sorted(SECOND_CTRL_C_SCENARIOS))
def test_a_second_ctrl_c_ends_the_process(backend_kwargs: dict[str, object], scenario: str) -> None:
    if scenario.endswith("on_trio"):
        pytest.importorskip("trio")
    process = _spawn(SECOND_CTRL_C_SCENARIOS[scenario], backend_kwargs)
    ended = _interrupt(process, *SECOND_CTRL_C_STEPS[scenario])
    assert ended.elapsed < 2.0, ended.stderr
    assert ended.returncode == -signal.SIGINT
    assert ended.stderr.splitlines()[-1].startswith("KeyboardInterrupt"), ended.stderr
    # A worker thread is still stuck in its clean-up: nothing else waits for it.
    assert "atexit handler ran" not in ended.stdout


def _run(body: str, backend_kwargs: dict[str, object], stdin: str | None = None) -> _Ended:
    process = _spawn(body, backend_kwargs, stdin=stdin is not None)
    started = time.monotonic()
    try:
        stdout, stderr = process.communicate(stdin, timeout=20)
    finally:
        process.kill()
        process.communicate()  # and close the pipes
    return _Ended(process.returncode, stdout, stderr, time.monotonic() - started)


LATE_POOL_SCENARIOS = {
    # atexit handlers run after the interpreter has waited for its threads.
    "atexit_handler": """
import atexit

def late():
    try:
        pool = PortalPool(2, backend=backend, backend_options=options)
    except RuntimeError as exc:
        print("refused:", exc, flush=True)
    else:
        pool.submit(slow_value, 7).add_done_callback(print_result)

atexit.register(late)
""",
    # A thread still running at exit starts one after portal_pool's exit hook has run,
    # and keeps it: the interpreter would wait for its threads forever.
    "thread_at_exit": """
import threading
hook_ran = threading.Event()
threading._register_atexit(hook_ran.set)  # registered first, so it runs after ours
kept = []

def late():
    hook_ran.wait()
    try:
        kept.append(PortalPool(2, backend=backend, backend_options=options))
    except RuntimeError as exc:
        print("refused:", exc, flush=True)
    else:
        kept[0].submit(slow_value, 7).add_done_callback(print_result)

threading.Thread(target=late).start()
""",
}


@pytest.mark.parametrize("scenario", sorted(LATE_POOL_SCENARIOS))
def test_a_pool_started_during_interpreter_exit_is_refused(
    backend_kwargs: dict[str, object], scenario: str
) -> None:
    ended = _run(LATE_POOL_SCENARIOS[scenario], backend_kwargs)
    assert ended.returncode == 0, ended.stderr
    assert "refused: cannot start a PortalPool while the interpreter is exiting" in ended.stdout
    assert ended.stderr == ""


def test_a_ctrl_c_handled_by_an_interactive_interpreter_is_not_the_exit(
    backend_kwargs: dict[str, object],
) -> None:
    # code.InteractiveInterpreter shows the KeyboardInterrupt and records it in
    # sys.last_exc; the script then ends normally and its work must finish.
    body = """
import code
pool = PortalPool(2, backend=backend, backend_options=options)
code.InteractiveInterpreter().runsource("raise KeyboardInterrupt")
pool.submit(slow_value, 7).add_done_callback(print_result)
"""
    ended = _run(body, backend_kwargs)
    assert ended.returncode == 0, ended.stderr
    assert "done 7" in ended.stdout


def test_a_ctrl_c_handled_by_the_repl_is_not_the_exit(backend_kwargs: dict[str, object]) -> None:
    # python -i reads statements from stdin; the REPL handles the KeyboardInterrupt and
    # goes on, then the session ends at EOF.
    statements = """
pool = PortalPool(2, backend=backend, backend_options=options)
raise KeyboardInterrupt
pool.submit(slow_value, 7).add_done_callback(print_result)
"""
    ended = _run("", backend_kwargs, stdin=textwrap.dedent(statements))
    assert ended.returncode == 0, ended.stderr
    assert "done 7" in ended.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_another_signal_handler_interrupting_the_exit_wait_sets_the_status(
    backend_kwargs: dict[str, object],
) -> None:
    # A SIGTERM handler that exits, as many services install, landing in the exit wait:
    # the work is cancelled and the process ends with the status the handler asked for.
    body = """
import signal
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
announce_joins()
pool = PortalPool(2, backend=backend, backend_options=options)
pool.submit(forever)
"""
    process = _spawn(body, backend_kwargs)
    assert process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "joining"
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
        process.communicate()  # and close the pipes
    assert process.returncode == 3
    assert stderr.splitlines() == [
        "SystemExit: portal_pool cancelled the work still running at interpreter exit"
    ]
