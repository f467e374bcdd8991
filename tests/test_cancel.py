"""Cancellation: running tasks, queued work that must never start, map and run.

On both hosts. On the process host a running task gets its cancellation in the worker
process's loop, and its ``finally`` blocks run there; the tasks record what they do in
``shared`` objects, which the test sees from its own process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .helpers import event_set, loop_held, wait_until

HOSTS = ("thread", "process", "ray")

MakePool = Callable[..., PortalPool[Any]]


def test_cancel_running_task_runs_its_finally(module_pool: PortalPool[Any], shared: Any) -> None:
    worker = module_pool.workers[0]
    started = shared.Event()
    release = shared.Event()
    cleaned_up = shared.Event()
    ran_in: list[int] = shared.list()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            ran_in.append(os.getpid())
            with anyio.CancelScope(shield=True):
                await event_set(release)  # a clean-up that takes its time
            cleaned_up.set()

    future = worker.submit(sleeper)
    assert started.wait(10)
    assert future.running()
    assert future.cancel() is True
    # Cancelled at once, while the task's clean-up has not ended.
    assert future.cancelled()
    assert future.done()
    with pytest.raises(CancelledError):
        future.result(timeout=0)
    assert not cleaned_up.is_set()
    release.set()
    assert cleaned_up.wait(10)
    assert list(ran_in) == [worker.pid]  # in the worker's loop: its process's, on that host
    assert worker.run(lambda: "still serving") == "still serving"


def test_shutdown_waits_for_a_cancelled_tasks_clean_up(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(1)
    started = shared.Event()
    release = shared.Event()
    steps: list[str] = shared.list()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):
                await event_set(release)
            steps.append("cleaned up")

    future = pool.submit(sleeper)
    assert started.wait(10)
    assert future.cancel()
    assert future.cancelled()
    shutdown = threading.Thread(target=pool.shutdown)  # wait=True
    shutdown.start()
    try:
        shutdown.join(0.2)
        assert shutdown.is_alive(), "shutdown() returned before the task's clean-up ended"
    finally:
        release.set()
        shutdown.join(10)
    assert not shutdown.is_alive()
    assert list(steps) == ["cleaned up"]


@pytest.mark.parametrize("max_concurrency", [None, 1], ids=["sent", "held_back"])
def test_cancelled_queued_work_never_starts(
    make_pool: MakePool, shared: Any, pool_host: str, max_concurrency: int | None
) -> None:
    # Queued behind a blocked loop. On the process host, without max_concurrency the
    # work is sent to the worker process at once, and waits there; with
    # max_concurrency=1 it is held back in this process, as the blocking call fills the
    # window.
    pool = make_pool(1, max_concurrency=max_concurrency)
    worker = pool.workers[0]
    ran: list[str] = shared.list()

    async def must_not_run() -> None:
        ran.append("ran")

    sent = pool_host != "thread" and max_concurrency is None
    with loop_held(worker.submit, shared) as blocker:
        queued = [worker.submit(must_not_run) for _ in range(5)]
        if sent:
            # Sent work is running, as this process sees it, though its loop has not
            # started it: cancel() is a running task's, delivered in the worker.
            wait_until(lambda: all(f.running() for f in queued))
        else:
            assert not any(f.running() for f in queued)
        assert all(f.cancel() for f in queued)
        # Cancelled futures are reported done at once, even while the loop is blocked.
        assert set(as_completed(queued, timeout=10)) == set(queued)
        if sent:
            # The worker process confirms the cancellations: from then on, the work is
            # sure never to start. (Had its loop got to the work first, the work would
            # have started, and got the cancellation as a running task.)
            wait_until(lambda: pool.stats().pending == 1)
        else:
            assert pool.stats().pending == 1  # only the blocking call: final at once
    blocker.result(timeout=10)
    pool.shutdown(wait=True)
    assert list(ran) == []
    assert all(f.cancelled() for f in queued)
    assert pool.stats().cancelled == 5


def test_cancel_finished_future_returns_false(module_pool: PortalPool[Any]) -> None:
    future = module_pool.submit(lambda: 1)
    assert future.result(timeout=10) == 1
    assert future.cancel() is False
    assert not future.cancelled()


def test_task_that_swallows_cancellation_still_ends_cancelled(
    module_pool: PortalPool[Any], shared: Any
) -> None:
    worker = module_pool.workers[0]
    started = shared.Event()

    async def stubborn() -> str:
        started.set()
        try:
            await anyio.sleep(3600)
        except BaseException:
            return "ignored the cancellation"
        return "unreachable"

    future = worker.submit(stubborn)
    assert started.wait(10)
    future.cancel()
    with pytest.raises(CancelledError):
        future.result(timeout=10)


def test_done_callbacks_fire_once_on_cancel(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(1)
    started = shared.Event()
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
    pool.shutdown(wait=True)  # the task's own end, reported later, calls nothing more
    assert calls == [True]


def test_result_timeout_then_cancel_stops_the_task(
    module_pool: PortalPool[Any], shared: Any
) -> None:
    started = shared.Event()
    cleaned_up = shared.Event()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    future = module_pool.workers[0].submit(sleeper)
    with pytest.raises(FutureTimeout):
        future.result(timeout=0.01)
    assert started.wait(10)  # cancelled while it runs, not before it starts
    future.cancel()
    assert cleaned_up.wait(10)
