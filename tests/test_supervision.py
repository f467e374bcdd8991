"""Supervision: a worker whose event loop dies is replaced, and nothing is left pending."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import wait
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import portal_pool._supervision
from portal_pool import BrokenPortalPool, PortalPool, current_worker
from portal_pool._supervision import RESTART_BURST, RESTART_WINDOW

from .faults import ConnectsOnce, kill_current_loop

MakePool = Callable[..., PortalPool[Any]]


class RecordEvents(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()


@pytest.fixture
def pool_log() -> Any:
    handler = RecordEvents()
    logger = logging.getLogger("portal_pool")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_dead_loop_is_replaced_and_its_futures_resolve(
    backend_kwargs: dict[str, Any], pool_log: RecordEvents
) -> None:
    entries: list[int] = []

    @asynccontextmanager
    async def resource() -> AsyncIterator[int]:
        entries.append(threading.get_ident())
        yield len(entries)

    started = threading.Semaphore(0)

    async def victim() -> None:
        started.release()
        await anyio.sleep(3600)

    async def killer() -> None:
        kill_current_loop()
        await anyio.sleep(3600)

    with PortalPool(1, worker_context=resource, **backend_kwargs) as pool:
        worker = pool.workers[0]
        assert worker.run(lambda: current_worker().context) == 1
        victims = [worker.submit(victim) for _ in range(3)]
        for _ in victims:
            assert started.acquire(timeout=10)
        doomed = worker.submit(killer)
        done, pending = wait([*victims, doomed], timeout=10)
        assert not pending
        for future in done:
            # Cancelled by the dying loop's cleanup, or failed with BrokenPortalPool.
            assert future.cancelled() or isinstance(future.exception(), BrokenPortalPool)
        # The worker came back with a new loop and a freshly entered context.
        assert worker.run(lambda: current_worker().context) == 2
        assert pool.run(lambda: "serving") == "serving"
    assert worker._restarts == 1
    assert pool_log.arrived.is_set()
    assert any("restarting" in r.getMessage() for r in pool_log.records)


def test_work_queued_during_a_restart_is_not_lost(backend_kwargs: dict[str, Any]) -> None:
    with PortalPool(1, **backend_kwargs) as pool:
        worker = pool.workers[0]

        def kill_and_queue() -> list[Any]:
            kill_current_loop()
            # Submitted from inside the dying loop: it must run on the next one.
            return [worker.submit(lambda n=n: n * 10) for n in range(5)]

        queued = worker.submit(kill_and_queue).result(timeout=10)
        assert [f.result(timeout=10) for f in queued] == [0, 10, 20, 30, 40]


def test_a_worker_that_cannot_restart_is_broken_not_spinning(
    backend_kwargs: dict[str, Any], pool_log: RecordEvents
) -> None:
    only_once = ConnectsOnce()
    pool = PortalPool(1, worker_context=only_once, **backend_kwargs)
    worker = pool.workers[0]
    worker.submit(kill_current_loop)
    worker._host_loop._thread.join(10)
    assert not worker._host_loop._thread.is_alive()
    with pytest.raises(BrokenPortalPool):
        worker.submit(anyio.sleep, 0)
    pool.shutdown()
    assert only_once.entries == 2
    [record] = [r for r in pool_log.records if r.levelno == logging.ERROR]
    assert "its replacement could not start; the worker is broken" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ConnectionError)


def ends_at_once_counting(entered: list[int]) -> Callable[[], Any]:
    """A worker_context that ends its body at the worker's first wait, every time."""

    @asynccontextmanager
    async def ends_at_once() -> AsyncIterator[None]:
        entered.append(1)
        with anyio.CancelScope() as body:
            body.cancel()
            yield

    return ends_at_once


def test_a_loop_that_fails_at_once_again_and_again_leaves_the_worker_broken(
    backend_kwargs: dict[str, Any], pool_log: RecordEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(portal_pool._supervision, "time", SimpleNamespace(monotonic=lambda: 0.0))
    entered: list[int] = []
    pool = PortalPool(1, worker_context=ends_at_once_counting(entered), **backend_kwargs)
    worker = pool.workers[0]
    worker._host_loop._thread.join(10)
    assert not worker._host_loop._thread.is_alive()  # it gave up instead of spinning
    with pytest.raises(BrokenPortalPool):
        pool.submit(anyio.sleep, 0)
    pool.shutdown()
    assert pool.stats().restarts == RESTART_BURST
    assert len(entered) == RESTART_BURST + 1
    [record] = [r for r in pool_log.records if r.levelno == logging.ERROR]
    assert f"failed again after {RESTART_BURST} restarts" in record.getMessage()


def test_failures_spread_over_time_are_each_restarted(
    backend_kwargs: dict[str, Any], pool_log: RecordEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = itertools.count()
    clock = SimpleNamespace(monotonic=lambda: next(ticks) * RESTART_WINDOW)  # each a window apart
    monkeypatch.setattr(portal_pool._supervision, "time", clock)
    entered: list[int] = []
    many = RESTART_BURST + 3
    restarted = threading.Semaphore(0)
    pool_log.emit = lambda record: restarted.release()  # type: ignore[method-assign]
    pool = PortalPool(1, worker_context=ends_at_once_counting(entered), **backend_kwargs)
    for _ in range(many):
        assert restarted.acquire(timeout=10)
    pool.shutdown()
    assert pool.stats().restarts >= many


def test_a_worker_context_that_ends_on_its_own_is_logged_and_replaced(
    backend_kwargs: dict[str, Any], pool_log: RecordEvents
) -> None:
    entries = 0

    @asynccontextmanager
    async def ends_itself() -> AsyncIterator[anyio.CancelScope]:
        nonlocal entries
        entries += 1
        # Its cancel catches the cancellation it sends into the worker: the body ends
        # without an error and without a stop request, as a timeout around it would.
        with anyio.CancelScope() as body:
            yield body

    started = threading.Event()

    async def bystander() -> None:
        started.set()
        await anyio.sleep(3600)

    with PortalPool(1, worker_context=ends_itself, **backend_kwargs) as pool:
        running = pool.submit(bystander)
        assert started.wait(10)
        pool.run(lambda: current_worker().context.cancel())
        assert pool_log.arrived.wait(10)  # the restart's warning
        done, _ = wait([running], timeout=10)
        assert done  # it ended with the loop that ran it
        assert running.cancelled() or isinstance(running.exception(), BrokenPortalPool)
        assert pool.run(lambda: "serving") == "serving"  # on the replacement loop
        assert entries == 2
        assert pool.stats().restarts == 1
    [record] = [r for r in pool_log.records if "restarting" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert "worker_context ended before the pool stopped it" in str(record.exc_info[1])


class Unprintable(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr() of the error failed")

    __str__ = __repr__


def test_a_loop_failure_whose_repr_fails_is_still_supervised(
    backend_kwargs: dict[str, Any], pool_log: RecordEvents
) -> None:
    entries = 0

    @asynccontextmanager
    async def fails_after_its_body() -> AsyncIterator[anyio.CancelScope]:
        nonlocal entries
        entries += 1
        with anyio.CancelScope() as body:
            yield body
        raise Unprintable  # the loop fails with an error that cannot be described

    with PortalPool(1, worker_context=fails_after_its_body, **backend_kwargs) as pool:
        pool.run(lambda: current_worker().context.cancel())
        assert pool_log.arrived.wait(10)  # the restart's warning
        assert pool.run(lambda: "serving") == "serving"  # on the replacement loop
        assert entries == 2
        assert pool.stats().restarts == 1
    failure = next(r for r in pool_log.records if "restarting" in r.getMessage())
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], Unprintable)
