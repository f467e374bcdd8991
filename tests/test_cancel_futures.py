"""shutdown(cancel_futures=True): which calls start, whatever the thread scheduling.

A call that has not started when ``shutdown(cancel_futures=True)`` is called never
starts, wherever it waits (the inbox, or a task or runner of its loop). A call that an
idle worker was given counts as started (as an item put for an idle ThreadPoolExecutor
thread does), even if that worker's thread has not run since: it waits for the GIL.
CPython's ``test_cancel_futures`` relies on both (see test_stdlib_executor.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool
from portal_pool._thread_host import ThreadLoop

from .helpers import loop_held


class DrainGate:
    """Holds a worker's loop as it is about to take its inbox, until released.

    A tracer installed in the worker threads (``threading.settrace``), which stops at the
    call of ``ThreadLoop._drain`` once armed: the loop has been woken for the work, and has
    not taken any of it yet, as when its thread is still waiting for the GIL.
    """

    def __init__(self) -> None:
        self._armed = threading.Event()
        self.entered = threading.Event()
        self._released = threading.Event()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Trace the threads started inside the block (a pool's workers)."""
        threading.settrace(self._trace)
        try:
            yield
        finally:
            threading.settrace(None)  # type: ignore[arg-type]

    def arm(self) -> None:
        self._armed.set()

    def release(self) -> None:
        self._released.set()

    def _trace(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is ThreadLoop._drain.__code__ and self._armed.is_set():
            self._armed.clear()
            self.entered.set()
            assert self._released.wait(10), "the test never released the gate"
        # No local tracing: the gate only needs calls.


@contextmanager
def gated_pool(backend_kwargs: dict[str, Any]) -> Iterator[tuple[PortalPool[Any], DrainGate]]:
    gate = DrainGate()
    with gate.installed():
        pool: PortalPool[Any] = PortalPool(1, **backend_kwargs)
    try:
        yield pool, gate
    finally:
        gate.release()
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(20)
def test_work_spawned_in_the_loop_but_not_started_never_starts(
    make_pool: Callable[..., Any],
) -> None:
    # The loop takes a burst (a task, or a runner's call, for each item), starts the
    # first and is held there; shutdown(cancel_futures=True) comes meanwhile. Was: the
    # stop reached the loop behind the burst's other items, which then ran (always on
    # asyncio, about half the time on trio).
    pool = make_pool(1)
    first_running = threading.Event()
    release_first = threading.Event()
    ran: list[int] = []

    def hold() -> str:
        first_running.set()
        assert release_first.wait(10)
        return "first"

    with loop_held(pool.submit):
        first = pool.submit(hold)
        rest = [pool.submit(ran.append, n) for n in range(4)]
    # The loop drains the four calls with the first; it runs and holds the loop.
    assert first_running.wait(10)
    pool.shutdown(wait=False, cancel_futures=True)
    release_first.set()
    pool.shutdown(wait=True)
    assert first.result(timeout=0) == "first"
    assert ran == []
    assert all(future.cancelled() for future in rest)
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.cancelled, stats.pending) == (2, 0, 4, 0)


@pytest.mark.timeout(20)
def test_idle_worker_runs_the_call_it_was_given_before_shutdown(
    backend_kwargs: dict[str, Any],
) -> None:
    # Was: shutdown(cancel_futures=True) right after a submit to an idle pool cancelled
    # the call whenever the worker's thread had not run yet (the submitting thread holds
    # the GIL for up to 5 ms), so whether anything ran was down to the scheduler.
    with gated_pool(backend_kwargs) as (pool, gate):
        gate.arm()
        given = pool.submit(lambda: "ran")
        queued = [pool.submit(lambda: "queued") for _ in range(3)]
        assert gate.entered.wait(10)  # woken for the call, and none of it taken yet
        pool.shutdown(wait=False, cancel_futures=True)
        assert all(future.cancelled() for future in queued)
        gate.release()
        pool.shutdown(wait=True)
        assert given.result(timeout=0) == "ran"
        stats = pool.stats()
        assert (stats.completed, stats.failed, stats.cancelled, stats.pending) == (1, 0, 3, 0)


@pytest.mark.timeout(20)
def test_given_async_call_is_cancelled_like_a_running_task(
    backend_kwargs: dict[str, Any],
) -> None:
    # Counted as started, it is treated as the running tasks are: it starts, gets the
    # cancellation in its loop, and its clean-up runs.
    started = threading.Event()
    cleaned_up = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    with gated_pool(backend_kwargs) as (pool, gate):
        gate.arm()
        given = pool.submit(forever)
        try:
            assert gate.entered.wait(10)
            pool.shutdown(wait=False, cancel_futures=True)
            gate.release()
            assert cleaned_up.wait(10), "the call the worker took was never cancelled"
        finally:
            given.cancel()  # a failure here must not leave the shutdown below hanging
        pool.shutdown(wait=True)
        assert started.is_set()
        assert given.cancelled()
        stats = pool.stats()
        assert (stats.completed, stats.failed, stats.cancelled, stats.pending) == (0, 0, 1, 0)
