"""Calls that used to hang forever: each now completes or raises a clear error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

MakePool = Callable[..., PortalPool[Any]]
TIMEOUT = 10


def test_shutdown_from_a_thread_its_own_task_waits_on(make_pool: MakePool) -> None:
    """Issue 10, item 6: the docs' advice for blocking calls (to_thread) must not deadlock.

    Chosen: a RuntimeError, like the one from a direct call in the pool's loop; the pool
    keeps serving, and shutdown(wait=False) from there is allowed.
    """
    pool = make_pool(2)

    async def shut_down_from_a_worker_thread() -> str:
        try:
            await anyio.to_thread.run_sync(pool.shutdown)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    message = pool.submit(shut_down_from_a_worker_thread).result(TIMEOUT)
    assert "would deadlock" in message
    assert "shutdown(wait=False)" in message
    assert pool.run(lambda: "still serving") == "still serving"

    async def stop_without_waiting() -> str:
        await anyio.to_thread.run_sync(lambda: pool.shutdown(wait=False))
        return "stopped"

    assert pool.submit(stop_without_waiting).result(TIMEOUT) == "stopped"
    pool.shutdown()


def test_shutdown_from_the_backends_own_to_thread(make_pool: MakePool, pool_backend: str) -> None:
    """Item 6 again, through the backend's own helper (asyncio.to_thread, trio.to_thread)."""
    pool = make_pool(1)

    async def shut_down() -> str:
        if pool_backend == "trio":
            import trio

            run_in_thread: Any = trio.to_thread.run_sync
        else:
            run_in_thread = asyncio.to_thread
        try:
            await run_in_thread(pool.shutdown)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "would deadlock" in pool.submit(shut_down).result(TIMEOUT)


def test_shutdown_from_an_unrelated_thread_still_waits(make_pool: MakePool) -> None:
    """The guard is about the pool's own tasks: another pool's task may shut this one down."""
    pool = make_pool(1)
    other = make_pool(1)

    async def shut_down_the_other_pool() -> str:
        await anyio.to_thread.run_sync(pool.shutdown)
        return "done"

    assert pool.submit(anyio.sleep, 0).result(TIMEOUT) is None
    assert other.submit(shut_down_the_other_pool).result(TIMEOUT) == "done"
    assert pool._shutdown


def _eager_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    return loop


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager task factories are 3.12+")
@pytest.mark.parametrize("max_concurrency", [None, 1])
def test_eager_task_factory(pool_backend: str, max_concurrency: int | None) -> None:
    """Issue 10, item 7: tasks that end in their first step (an eager task factory) are
    forgotten at once, so max_concurrency keeps starting work and shutdown() returns."""
    if pool_backend == "trio":
        pytest.skip("an eager task factory is an asyncio loop option")
    if pool_backend == "uvloop":
        pytest.skip("uvloop 0.23 cannot run asyncio.eager_task_factory at all (TypeError)")
    pool = PortalPool(
        1,
        backend="asyncio",
        backend_options={"loop_factory": _eager_loop},
        max_concurrency=max_concurrency,
        max_pending=5000,
    )
    release = threading.Event()

    async def no_await(n: int) -> int:
        return n

    async def waits(n: int) -> int:
        await anyio.to_thread.run_sync(release.wait, TIMEOUT)
        return n

    try:
        assert pool.run(asyncio.get_running_loop).get_task_factory() is not None
        # Thousands that finish in their first step, then one that suspends: with a cap of
        # one, each must free its slot for the next (and the stack must stay flat).
        futures = [pool.submit(no_await, n) for n in range(3000)]
        futures.append(pool.submit(waits, -1))
        futures.append(pool.submit(lambda: "sync"))
        release.set()
        assert [f.result(TIMEOUT) for f in futures[:3000]] == list(range(3000))
        assert futures[-2].result(TIMEOUT) == -1
        assert futures[-1].result(TIMEOUT) == "sync"
    finally:
        pool.shutdown()  # used to hang forever
    stats = pool.stats()
    assert stats.pending == 0, stats
    assert stats.completed == 3003, stats
    assert pool._pending_limit is not None
    assert pool._pending_limit.count == 0


FORK_SCRIPT = """
import faulthandler, os, signal, sys, threading, warnings
import anyio
from portal_pool import BrokenPortalPool, PortalPool

backend, options = sys.argv[1], eval(sys.argv[2])
pool = PortalPool(2, backend=backend, backend_options=options, max_pending=10)
started = threading.Event()

async def forever():
    started.set()
    await anyio.sleep_forever()

running = pool.submit(forever)
assert started.wait(5)
warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, use of fork()"
pid = os.fork()
# Armed after the fork: faulthandler's watchdog thread does not survive a fork, and a
# child that inherits an armed one waits for it forever at exit.
if pid == 0:
    signal.alarm(8)  # a hang in the child kills it (the parent then reports its status)
    def refused(call):
        try:
            call()
        except BrokenPortalPool as exc:
            assert "os.fork()" in str(exc), exc
            return "refused"
        return "accepted"

    outcomes = [
        refused(lambda: pool.submit(anyio.sleep, 0)),
        refused(lambda: pool.run(anyio.sleep, 0)),
        refused(lambda: list(pool.map(abs, [1, 2]))),
        refused(lambda: pool.workers[1].submit(abs, 1)),
        refused(lambda: anyio.run(pool.run_async, abs, 1)),
        refused(lambda: running.result(5)),  # in flight at the fork: failed in the child
        refused(pool.shutdown),
    ]
    print("child", outcomes, pool.stats().pending, flush=True)
    sys.exit(0)  # a normal exit: the interpreter's exit hook runs too
faulthandler.dump_traceback_later(8, exit=True)  # a hang shows its stacks, then exits
_, status = os.waitpid(pid, 0)
print("child status", os.waitstatus_to_exitcode(status), flush=True)
assert running.cancel()
pool.shutdown()
print("parent done", running.cancelled(), pool.stats().pending, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pool_inherited_across_fork(backend_kwargs: dict[str, Any]) -> None:
    """Issue 10, item 8: in a forked child every use is refused, naming fork, and the
    work in flight at the fork fails there; nothing hangs and the child exits normally.
    The parent's pool is untouched."""
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(FORK_SCRIPT),
            backend_kwargs["backend"],
            repr(backend_kwargs["backend_options"]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines == [
        f"child {['refused'] * 7} 0",
        "child status 0",
        "parent done True 0",
    ], completed.stdout + completed.stderr
    assert completed.stderr == ""
