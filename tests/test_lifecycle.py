"""Races in a task's life cycle, forced line by line, and the exactness of the accounting.

A ``sys.settrace`` tracer installed in a worker's loop thread pauses that thread at a
chosen point of the runtime, while the test thread acts (cancels, kills the loop); then
it lets the worker go on. Nothing here waits on a timer.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from types import FrameType
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .faults import ConnectsOnce, kill_current_loop
from .helpers import at_line

MakePool = Callable[..., PortalPool[Any]]
TIMEOUT = 10

# The modules whose lines run a call in the loop, on each backend.
RUNTIME_MODULES = frozenset({"portal_pool._asyncio_runtime", "portal_pool._trio_runtime"})


class PauseWhenRunning:
    """A tracer for a worker's loop thread: at the first line the runtime runs after a
    future turned ``RUNNING``, that thread waits until the test releases it.

    ``target`` picks the future; ``None`` takes the first ``RUNNING`` one seen. With
    ``release_when_done``, the future's settling (a cancel() from another thread)
    releases the worker too.
    """

    def __init__(self, *, release_when_done: bool = False) -> None:
        self.release_when_done = release_when_done
        self.target: Future[Any] | None = None
        self.reached = threading.Event()
        self.release = threading.Event()
        self.fired = False

    def __call__(self, frame: FrameType, event: str, arg: object) -> Any:
        if self.fired or frame.f_globals.get("__name__") not in RUNTIME_MODULES:
            return None
        return self._line

    def _line(self, frame: FrameType, event: str, arg: object) -> Any:
        if event != "line" or self.fired:
            return None if self.fired else self._line
        future = frame.f_locals.get("future")
        if not isinstance(future, Future) or future._state != "RUNNING":  # type: ignore[attr-defined]
            return self._line
        if self.target is not None and future is not self.target:
            return self._line
        self.fired = True
        if self.release_when_done:
            future.add_done_callback(lambda _: self.release.set())
        self.reached.set()
        assert self.release.wait(TIMEOUT)
        return None


@contextmanager
def traced_worker(pool: PortalPool[Any], tracer: PauseWhenRunning) -> Iterator[None]:
    """Install ``tracer`` in the pool's only worker thread; remove it afterwards."""
    pool.run(sys.settrace, tracer)
    try:
        yield
    finally:
        tracer.release.set()
        if not pool._shutdown:  # else the tracer ends with its thread
            pool.run(sys.settrace, None)


def assert_exact(pool: PortalPool[Any], **expected: int) -> None:
    """After the pool has ended: nothing pending, the counters as expected, no room held."""
    stats = pool.stats()
    assert stats.pending == 0, stats
    assert stats.restarts == 0, stats
    for name, value in expected.items():
        assert getattr(stats, name) == value, stats
    if pool._pending_limit is not None:
        assert pool._pending_limit.count == 0


def test_cancel_between_running_and_taking_the_call(make_pool: MakePool) -> None:
    """Issue 10, item 1: the cancel wins cleanly and no other task notices."""
    pool = make_pool(1, max_pending=10)
    cleanup = threading.Event()
    bystander_running = threading.Event()
    go = threading.Event()

    async def target() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cleanup.set()

    async def bystander() -> str:
        bystander_running.set()
        await anyio.to_thread.run_sync(go.wait, TIMEOUT)
        return "bystander done"

    other = pool.submit(bystander)
    assert bystander_running.wait(TIMEOUT)  # suspended before the tracer is in place
    tracer = PauseWhenRunning()
    with traced_worker(pool, tracer):
        victim = pool.submit(target)
        tracer.target = victim
        assert tracer.reached.wait(TIMEOUT)
        assert victim.cancel()
        tracer.release.set()
        assert victim.cancelled()
        go.set()
        assert other.result(TIMEOUT) == "bystander done"
    pool.shutdown()
    # The call had begun, so the cancellation reached it in its loop: its finally ran.
    assert cleanup.is_set()
    # settrace x2 and the bystander completed; the victim is counted once, as cancelled.
    assert_exact(pool, completed=3, cancelled=1, failed=0)


@pytest.mark.anyio
async def test_run_async_cancelled_as_its_task_starts(make_pool: MakePool) -> None:
    """Issue 10, item 2: the caller returns promptly, with its own cancellation."""
    pool = make_pool(1, max_pending=10)
    # The worker goes on once the caller's cancellation has cancelled the future.
    tracer = PauseWhenRunning(release_when_done=True)
    await pool.run_async(sys.settrace, tracer)
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as group:
                group.start_soon(pool.run_async, anyio.sleep_forever)
                await anyio.to_thread.run_sync(tracer.reached.wait, TIMEOUT)
                group.cancel_scope.cancel()
    finally:
        tracer.release.set()
        await pool.run_async(sys.settrace, None)
    pool.shutdown()
    assert_exact(pool, completed=2, cancelled=1, failed=0)


class Boom(BaseException):
    """Not an Exception: what a careless done callback might raise."""


def test_done_callback_raising_base_exception(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10, item 3: the callback's error is logged; nothing else is affected."""
    pool = make_pool(1, max_pending=10)
    release = threading.Event()

    async def bystander() -> str:
        await anyio.to_thread.run_sync(release.wait, TIMEOUT)
        return "bystander done"

    def explode(_: Future[Any]) -> None:
        raise Boom("from a done callback")

    gate = threading.Event()

    async def value_once_open() -> str:
        await anyio.to_thread.run_sync(gate.wait, TIMEOUT)
        return "value"

    with caplog.at_level(logging.ERROR):
        other = pool.submit(bystander)
        # Not done before the callback is added (as a plain lambda could be, on a
        # free-threaded build): add_done_callback would call it here, in this thread.
        finished = pool.submit(value_once_open)
        finished.add_done_callback(explode)
        # The same from cancel(), in this thread, on queued and on running work.
        queued_hold = pool.submit(anyio.sleep_forever)
        queued_hold.add_done_callback(explode)
        assert queued_hold.cancel()
        gate.set()
        assert finished.result(TIMEOUT) == "value"
        release.set()
        assert other.result(TIMEOUT) == "bystander done"
    pool.shutdown()
    messages = [r for r in caplog.records if r.exc_info and r.exc_info[0] is Boom]
    assert len(messages) == 2
    assert_exact(pool, completed=2, cancelled=1, failed=0)


def test_counts_exact_when_the_worker_dies_and_cannot_restart(
    backend_kwargs: dict[str, Any],
) -> None:
    """Issue 10, item 4: futures cancelled while queued are counted once, even when their
    worker's loop then dies and cannot restart, and the ``max_pending`` room comes back."""
    only_once = ConnectsOnce()
    holding = threading.Event()
    release = threading.Event()

    def kill_then_hold() -> None:  # sync: the loop takes nothing from its inbox meanwhile
        kill_current_loop()
        holding.set()
        assert release.wait(TIMEOUT)

    pool = PortalPool(1, worker_context=only_once, max_pending=20, **backend_kwargs)
    try:
        holder = pool.submit(kill_then_hold)
        assert holding.wait(TIMEOUT)
        queued = [pool.submit(anyio.sleep, 0) for _ in range(5)]
        for future in queued:
            assert future.cancel()
        release.set()
        pool.workers[0]._host_loop._thread.join(TIMEOUT)
        assert not pool.workers[0]._host_loop.is_alive()
    finally:
        pool.shutdown()
    assert only_once.entries == 2
    assert holder.done()
    stats = pool.stats()
    assert stats.cancelled == 5, stats
    assert stats.completed + stats.failed == 1, stats  # the holder, whichever way it ended
    assert stats.pending == 0, stats
    assert pool._pending_limit is not None
    assert pool._pending_limit.count == 0


def test_cancelling_stop_while_its_queued_work_starts(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10, item 5: the exit hook's cancelling stop (the one shutdown(cancel_futures=
    True) makes) takes the queued work, then cancels it; a task that the loop starts in
    between must still end quietly: no loop restart, nothing logged, every count exact.

    A tracer in this thread stops the stop at its cancelling loop until the worker has
    started the victim (and paused there) or settled it.
    """
    pool = make_pool(1, max_pending=10)
    worker_tracer = PauseWhenRunning(release_when_done=True)
    victim_settled_or_paused = worker_tracer.reached
    held = threading.Event()
    release_hold = threading.Event()

    def hold() -> None:
        sys.settrace(worker_tracer)  # traces what runs after this call, not the call
        held.set()
        assert release_hold.wait(TIMEOUT)

    def let_the_victim_start() -> None:
        release_hold.set()
        assert victim_settled_or_paused.wait(TIMEOUT)

    stop_tracer = at_line("_request_stop", "for future in queued:", let_the_victim_start)

    with caplog.at_level(logging.DEBUG, logger="portal_pool"):
        holder = pool.submit(hold)
        assert held.wait(TIMEOUT)
        victim = pool.submit(anyio.sleep_forever)
        worker_tracer.target = victim
        victim.add_done_callback(lambda _: victim_settled_or_paused.set())
        sys.settrace(stop_tracer)
        try:
            pool.shutdown(wait=False, cancel_futures=True)
        finally:
            sys.settrace(None)
        worker_tracer.release.set()
        pool._join()
    assert holder.result(TIMEOUT) is None
    assert victim.cancelled()
    assert [r.getMessage() for r in caplog.records if r.name == "portal_pool"] == []
    assert_exact(pool, completed=1, cancelled=1, failed=0)
