"""Cancellation: running tasks, queued work that must never start, map and run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .helpers import loop_held

MakePool = Callable[..., PortalPool[Any]]


def test_cancel_running_task_runs_its_finally(make_pool: MakePool) -> None:
    pool = make_pool(1)
    started = threading.Event()
    cleaned_up = threading.Event()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    future = pool.submit(sleeper)
    assert started.wait(10)
    assert future.running()
    assert future.cancel() is True
    assert future.cancelled()
    with pytest.raises(CancelledError):
        future.result(timeout=10)
    assert cleaned_up.wait(10)
    assert pool.run(lambda: "still serving") == "still serving"


def test_cancelled_queued_work_never_starts(make_pool: MakePool) -> None:
    pool = make_pool(1)
    worker = pool.workers[0]
    ran: list[str] = []

    async def must_not_run() -> None:
        ran.append("ran")

    with loop_held(worker.submit) as blocker:
        queued = [worker.submit(must_not_run) for _ in range(5)]
        assert all(f.cancel() for f in queued)
        # Cancelled futures are reported done at once, even while the loop is blocked.
        assert set(as_completed(queued, timeout=10)) == set(queued)
    blocker.result(timeout=10)
    pool.shutdown(wait=True)
    assert ran == []
    assert all(f.cancelled() for f in queued)


def test_cancel_finished_future_returns_false(make_pool: MakePool) -> None:
    pool = make_pool(1)
    future = pool.submit(lambda: 1)
    assert future.result(timeout=10) == 1
    assert future.cancel() is False
    assert not future.cancelled()


def test_task_that_swallows_cancellation_still_ends_cancelled(make_pool: MakePool) -> None:
    pool = make_pool(1)
    started = threading.Event()

    async def stubborn() -> str:
        started.set()
        try:
            await anyio.sleep(3600)
        except BaseException:
            return "ignored the cancellation"
        return "unreachable"

    future = pool.submit(stubborn)
    assert started.wait(10)
    future.cancel()
    with pytest.raises(CancelledError):
        future.result(timeout=10)


def test_done_callbacks_fire_once_on_cancel(make_pool: MakePool) -> None:
    pool = make_pool(1)
    started = threading.Event()
    calls: list[bool] = []
    called = threading.Event()

    async def sleeper() -> None:
        started.set()
        await anyio.sleep(3600)

    future = pool.submit(sleeper)
    future.add_done_callback(lambda f: (calls.append(f.cancelled()), called.set()))
    assert started.wait(10)
    future.cancel()
    assert called.wait(10)
    pool.shutdown(wait=True)
    assert calls == [True]


def test_result_timeout_then_cancel_stops_the_task(make_pool: MakePool) -> None:
    pool = make_pool(1)
    cleaned_up = threading.Event()

    async def sleeper() -> None:
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    future = pool.submit(sleeper)
    with pytest.raises(FutureTimeout):
        future.result(timeout=0.01)
    future.cancel()
    assert cleaned_up.wait(10)
