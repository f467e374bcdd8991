"""The stall watchdog: a worker loop blocked by sync code is reported once, with its stack.

On the process host the watchdog runs in each worker process, and the parent logs its
reports on its own ``portal_pool`` logger and counts them in ``stats()``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

HOSTS = ("thread", "process", "ray")

STALL_TIMEOUT = 0.2


class RecordWarnings(logging.Handler):
    """Collects the ``portal_pool`` logger's warnings; lets a test wait for the n-th one."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._arrived = threading.Condition()
        # Called as each record is logged; what it returns is kept in ``seen``.
        self.on_emit: Callable[[], Any] | None = None
        self.seen: list[Any] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._arrived:
            self.records.append(record)
            if self.on_emit is not None:
                self.seen.append(self.on_emit())
            self._arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.records) >= count, timeout)

    def messages(self) -> list[str]:
        with self._arrived:
            return [record.getMessage() for record in self.records]


@pytest.fixture
def warnings_log() -> Iterator[RecordWarnings]:
    handler = RecordWarnings()
    logger = logging.getLogger("portal_pool")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll a condition that only another thread can make true, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def lag(pool: PortalPool[Any], index: int) -> float:
    """How long the watchdog's current (or last) ping to worker ``index`` has waited."""
    value = pool.stats().workers[index].loop_lag
    return -1.0 if value is None else value


@asynccontextmanager
async def imported_first() -> AsyncIterator[None]:
    """A worker_context from this module, so that a worker process imports the module
    (pytest with it) as it starts, before its watchdog runs.

    Otherwise the first task's first step imports them, and on a slower interpreter (the
    free-threaded 3.13t, on a loaded machine) that takes longer than ``STALL_TIMEOUT``: a
    real stall, reported with the import's stack, before the one a test causes.
    """
    yield


class Stall:
    """A sync call that holds a worker's loop until released."""

    def __init__(self, shared: Any) -> None:
        self.entered = shared.Event()
        self.release = shared.Event()

    def block_the_loop_right_here(self) -> str:
        self.entered.set()
        self.release.wait(10)
        return "unblocked"


def stall_and_release(
    pool: PortalPool[Any], index: int, log: RecordWarnings, nth: int, shared: Any
) -> None:
    """Hold worker ``index``'s loop until the ``nth`` warning, then for many more checks."""
    stall = Stall(shared)
    future = pool.workers[index].submit(stall.block_the_loop_right_here)
    try:
        assert stall.entered.wait(10)
        assert log.wait_for(nth), f"no stall warning after {pool.stats()}"
        # The watchdog updates loop_lag at every check while the ping is unanswered: a
        # lag of two timeouts means several checks (a quarter timeout apart) have passed
        # since the report.
        assert wait_until(lambda: lag(pool, index) >= 2 * STALL_TIMEOUT)
    finally:
        stall.release.set()
    assert future.result(timeout=10) == "unblocked"
    # The loop answers the stalled ping, then a fresh ping starts a new cycle.
    assert wait_until(lambda: 0 <= lag(pool, index) < STALL_TIMEOUT)


def test_a_stall_is_reported_once_with_the_blocking_stack(
    backend_kwargs: dict[str, Any], warnings_log: RecordWarnings, shared: Any
) -> None:
    with PortalPool(
        2,
        stall_timeout=STALL_TIMEOUT,
        thread_name_prefix="stall",
        worker_context=imported_first,
        **backend_kwargs,
    ) as pool:
        warnings_log.on_emit = lambda: pool.stats().stalls
        stall_and_release(pool, 1, warnings_log, nth=1, shared=shared)
        stats = pool.stats()
    assert warnings_log.seen == [1]  # counted by the time it is logged
    assert len(warnings_log.records) == 1
    record = warnings_log.records[0]
    assert record.levelno == logging.WARNING
    assert record.name == "portal_pool"
    message = record.getMessage()
    assert "worker 1" in message
    assert "worker 0" not in message
    assert "block_the_loop_right_here" in message  # the stack of the blocked thread
    assert [w.stalls for w in stats.workers] == [0, 1]
    assert stats.stalls == 1


def test_a_second_stall_counts_two(
    backend_kwargs: dict[str, Any], warnings_log: RecordWarnings, shared: Any
) -> None:
    with PortalPool(
        1, stall_timeout=STALL_TIMEOUT, worker_context=imported_first, **backend_kwargs
    ) as pool:
        stall_and_release(pool, 0, warnings_log, nth=1, shared=shared)
        assert pool.stats().workers[0].stalls == 1
        stall_and_release(pool, 0, warnings_log, nth=2, shared=shared)
        stats = pool.stats()
    assert stats.workers[0].stalls == 2
    assert stats.stalls == 2
    messages = warnings_log.messages()
    assert len(messages) == 2
    assert "(stall 1)" in messages[0]
    assert "(stall 2)" in messages[1]
    assert all("block_the_loop_right_here" in message for message in messages)


async def busy(n: int) -> int:
    for _ in range(3):
        await anyio.sleep(0)
    return n


def test_no_warning_when_nothing_stalls(
    backend_kwargs: dict[str, Any], warnings_log: RecordWarnings
) -> None:
    # A roomier timeout than the stall tests: only a loop that is really blocked may
    # be reported, even on a loaded machine.
    timeout = 0.4
    with PortalPool(
        2, stall_timeout=timeout, worker_context=imported_first, **backend_kwargs
    ) as pool:
        assert list(pool.map(busy, range(300))) == list(range(300))
        assert list(pool.map(busy, range(300), chunksize=32)) == list(range(300))
        # Let the watchdog run several ping cycles on each worker: every new reading of
        # loop_lag is one check or one answered ping.
        readings: list[set[float]] = [set(), set()]

        def cycles() -> bool:
            for index, seen in enumerate(readings):
                seen.add(lag(pool, index))
            return all(len(seen - {-1.0}) >= 5 for seen in readings)

        assert wait_until(cycles)
        assert max(max(seen) for seen in readings) < timeout
        stats = pool.stats()
    assert warnings_log.records == []
    assert stats.stalls == 0
    assert all(w.loop_lag is not None and w.loop_lag < timeout for w in stats.workers)


def test_loop_lag_is_none_without_a_watchdog(backend_kwargs: dict[str, Any]) -> None:
    with PortalPool(1, **backend_kwargs) as pool:
        assert pool.run(lambda: 1) == 1
        assert pool.stats().workers[0].loop_lag is None
    assert not any(t.name.endswith("-watchdog") for t in threading.enumerate())


def _watchdogs(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"{prefix}-watchdog"]


@pytest.mark.hosts("thread")  # a worker process watches its own loop
def test_the_watchdog_thread_is_gone_after_shutdown(backend_kwargs: dict[str, Any]) -> None:
    pool = PortalPool(1, stall_timeout=STALL_TIMEOUT, thread_name_prefix="wd1", **backend_kwargs)
    assert len(_watchdogs("wd1")) == 1
    pool.shutdown(wait=True)
    assert _watchdogs("wd1") == []


@pytest.mark.hosts("thread")  # a worker process watches its own loop
def test_the_watchdog_thread_ends_after_shutdown_without_wait(
    backend_kwargs: dict[str, Any],
) -> None:
    pool = PortalPool(1, stall_timeout=STALL_TIMEOUT, thread_name_prefix="wd2", **backend_kwargs)
    (watchdog,) = _watchdogs("wd2")
    pool.shutdown(wait=False)
    watchdog.join(timeout=10)
    assert not watchdog.is_alive()
    pool.shutdown(wait=True)


@pytest.mark.hosts("thread")  # a worker process watches its own loop
def test_the_watchdog_thread_is_gone_after_a_failed_with_block(
    backend_kwargs: dict[str, Any],
) -> None:
    class Boom(Exception):
        pass

    with (
        pytest.raises(Boom),
        PortalPool(1, stall_timeout=STALL_TIMEOUT, thread_name_prefix="wd3", **backend_kwargs),
    ):
        assert len(_watchdogs("wd3")) == 1
        raise Boom
    assert _watchdogs("wd3") == []


@pytest.mark.hosts("thread")  # a worker process watches its own loop
@pytest.mark.anyio
async def test_the_watchdog_thread_is_gone_after_async_with(
    backend_kwargs: dict[str, Any],
) -> None:
    async with PortalPool(
        2, stall_timeout=STALL_TIMEOUT, thread_name_prefix="wd4", **backend_kwargs
    ) as pool:
        assert len(_watchdogs("wd4")) == 1
        assert await pool.run_async(busy, 3) == 3
    assert _watchdogs("wd4") == []


@pytest.mark.hosts("process")
def test_stalls_in_a_worker_process_stay_counted_after_it_is_replaced(
    backend_kwargs: dict[str, Any], warnings_log: RecordWarnings, shared: Any
) -> None:
    with PortalPool(
        1, stall_timeout=STALL_TIMEOUT, worker_context=imported_first, **backend_kwargs
    ) as pool:
        stall_and_release(pool, 0, warnings_log, nth=1, shared=shared)
        first = pool.workers[0].pid
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: pool.workers[0].pid != first)  # a replacement started
        assert pool.workers[0].run(os.getpid) == pool.workers[0].pid
        # Its own count starts from 0: the pool's goes on from 1.
        stall_and_release(pool, 0, warnings_log, nth=3, shared=shared)
        stats = pool.stats()
    assert (stats.stalls, stats.restarts) == (2, 1)
    stall, restart, second_stall = warnings_log.messages()
    assert "block_the_loop_right_here" in stall
    assert "killed by SIGKILL" in restart
    assert "block_the_loop_right_here" in second_stall
    # The message numbers the stall as the process that logged it counts them.
    assert "(stall 1)" in second_stall
