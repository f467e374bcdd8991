"""Shutdown, context managers, and calls that must fail fast instead of deadlocking."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .conftest import requires_trio

MakePool = Callable[..., PortalPool[Any]]


def test_shutdown_wait_waits_for_every_task(make_pool: MakePool) -> None:
    pool = make_pool(2)
    gate = threading.Event()
    done: list[int] = []

    async def task(n: int) -> None:
        await anyio.to_thread.run_sync(gate.wait, 10)
        done.append(n)

    futures = [pool.submit(task, n) for n in range(6)]
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    stopper.join(timeout=0.1)
    assert stopper.is_alive(), "shutdown(wait=True) returned while tasks were still waiting"
    assert done == []
    gate.set()
    stopper.join(10)
    assert sorted(done) == list(range(6))
    assert all(f.done() and not f.cancelled() for f in futures)
    assert not any(w._host_loop.is_alive() for w in pool.workers)


def test_shutdown_cancel_futures_is_prompt(make_pool: MakePool) -> None:
    pool = make_pool(2)
    entered = threading.Semaphore(0)
    cleanups: list[int] = []

    async def sleeper(n: int) -> None:
        try:
            entered.release()
            await anyio.sleep(3600)
        finally:
            cleanups.append(n)

    futures = [pool.submit(sleeper, n) for n in range(4)]
    for _ in futures:
        assert entered.acquire(timeout=10)
    begin = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - begin < 1.0
    assert all(f.cancelled() for f in futures)
    assert sorted(cleanups) == [0, 1, 2, 3]


def test_submit_after_shutdown_raises(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(lambda: None)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.workers[0].submit(lambda: None)


def test_shutdown_twice_and_from_many_threads(make_pool: MakePool) -> None:
    pool = make_pool(2)
    future = pool.submit(anyio.sleep, 0)
    threads = [threading.Thread(target=pool.shutdown) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.shutdown()
    pool.shutdown(wait=False, cancel_futures=True)
    assert future.done()


def test_with_block_waits_on_normal_exit(backend_kwargs: dict[str, Any]) -> None:
    async def slow() -> str:
        await anyio.sleep(0.05)
        return "done"

    with PortalPool(2, **backend_kwargs) as pool:
        futures = [pool.submit(slow) for _ in range(4)]
    assert [f.result(timeout=0) for f in futures] == ["done"] * 4


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_with_block_exception_cancels_and_reraises(
    backend_kwargs: dict[str, Any], error: type[BaseException]
) -> None:
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep(3600)

    with pytest.raises(error), PortalPool(2, **backend_kwargs) as pool:
        future = pool.submit(forever)
        assert started.wait(10)
        raise error
    assert future.cancelled()
    assert not any(w._host_loop.is_alive() for w in pool.workers)


def test_blocking_calls_inside_own_loop_raise(make_pool: MakePool) -> None:
    pool = make_pool(2)

    async def misuse() -> list[str]:
        errors = []
        for call in (
            lambda: pool.run(anyio.sleep, 0),
            lambda: pool.shutdown(wait=True),
            lambda: pool.workers[0].run(anyio.sleep, 0),
        ):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))
        return errors

    errors = pool.workers[0].run(misuse)
    assert len(errors) == 3
    assert all("would deadlock" in message for message in errors)
    # Waiting on a future of one's own worker is refused too.

    async def wait_own() -> str:
        inner = pool.workers[1].submit(anyio.sleep, 0)
        try:
            inner.result()
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "would deadlock" in pool.workers[1].run(wait_own)


def _in_foreign_loop(loop_backend: str, body: Callable[[], None]) -> None:
    """Run ``body`` synchronously inside a running asyncio or trio loop."""

    async def host() -> None:
        body()

    if loop_backend == "asyncio":
        asyncio.run(host())
    else:
        import trio

        trio.run(host)


@pytest.mark.parametrize("loop_backend", ["asyncio", pytest.param("trio", marks=requires_trio)])
def test_submit_and_shutdown_from_a_thread_running_a_loop(
    backend_kwargs: dict[str, Any], loop_backend: str
) -> None:
    results: list[int] = []

    async def double(n: int) -> int:
        return n * 2

    def body() -> None:
        pool = PortalPool(2, **backend_kwargs)
        futures = [pool.submit(double, n) for n in range(10)]
        with pool:  # the sync exit, from inside a foreign loop
            pass
        results.extend(f.result(timeout=0) for f in futures)

    _in_foreign_loop(loop_backend, body)
    assert results == [n * 2 for n in range(10)]


def test_pool_dropped_without_shutdown_stops_its_workers(backend_kwargs: dict[str, Any]) -> None:
    import gc

    pool = PortalPool(2, **backend_kwargs)
    future = pool.submit(anyio.sleep, 0)
    threads = [w._host_loop._thread for w in pool.workers]
    del pool
    gc.collect()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert future.done()
