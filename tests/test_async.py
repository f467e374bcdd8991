"""run_async and ``async with`` from asyncio and trio callers, on every pool backend."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

HOSTS = ("thread", "process")

MakePool = Callable[..., PortalPool[Any]]

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


async def test_run_async_returns_and_raises(make_pool: MakePool) -> None:
    pool = make_pool(2)

    async def double(n: int) -> int:
        await anyio.sleep(0)
        return n * 2

    async def fail() -> None:
        raise Boom("worker side")

    assert await pool.run_async(double, 21) == 42
    assert await pool.run_async(lambda: "sync") == "sync"
    with pytest.raises(Boom, match="worker side"):
        await pool.run_async(fail)
    async with anyio.create_task_group() as group:
        for n in range(20):
            group.start_soon(pool.run_async, double, n)


async def test_run_async_does_not_block_the_caller_loop(make_pool: MakePool) -> None:
    pool = make_pool(1)
    gate = threading.Event()
    entered = threading.Event()

    def wait_gate() -> None:
        entered.set()
        gate.wait(10)

    async def hold() -> str:
        await anyio.to_thread.run_sync(wait_gate)
        return "released"

    async with anyio.create_task_group() as group:
        results: list[str] = []

        async def call() -> None:
            results.append(await pool.run_async(hold))

        group.start_soon(call)
        # The caller's loop keeps running while the worker holds the task.
        await anyio.to_thread.run_sync(entered.wait, 10)
        await anyio.sleep(0)
        gate.set()
    assert results == ["released"]


async def test_cancelling_the_caller_cancels_the_worker_task(make_pool: MakePool) -> None:
    pool = make_pool(1)
    started = threading.Event()
    cleanup_finished = threading.Event()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
            cleanup_finished.set()

    with anyio.CancelScope() as scope:

        async def cancel_when_started() -> None:
            await anyio.to_thread.run_sync(started.wait, 10)
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(cancel_when_started)
            await pool.run_async(sleeper)
    assert scope.cancelled_caught
    # run_async returned only after the worker task had finished its cleanup.
    assert cleanup_finished.is_set()


async def test_async_with_waits_without_blocking_the_loop(backend_kwargs: dict[str, Any]) -> None:
    ticks = 0
    finished = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not finished.is_set():
            ticks += 1
            await anyio.sleep(0.001)

    async def slow() -> str:
        await anyio.sleep(0.1)
        return "ok"

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        async with PortalPool(2, **backend_kwargs) as pool:
            futures = [pool.submit(slow) for _ in range(4)]
            before = ticks
        finished.set()
    assert ticks > before  # the caller's loop ran while the pool shut down
    assert [f.result(timeout=0) for f in futures] == ["ok"] * 4
    assert not any(w._host_loop.is_alive() for w in pool.workers)


async def test_async_with_error_cancels_remaining_work(backend_kwargs: dict[str, Any]) -> None:
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep(3600)

    with pytest.raises(Boom):
        async with PortalPool(1, **backend_kwargs) as pool:
            future = pool.submit(forever)
            await anyio.to_thread.run_sync(started.wait, 10)
            raise Boom
    assert future.cancelled()


async def test_run_async_after_shutdown_raises(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        await pool.run_async(anyio.sleep, 0)


async def test_run_async_from_inside_a_worker(make_pool: MakePool) -> None:
    pool = make_pool(2)

    async def inner() -> int:
        return 7

    async def outer() -> int:
        # Nested use from a worker: async, so no deadlock even on the same worker.
        return await pool.workers[0].run_async(inner) + await pool.workers[1].run_async(inner)

    assert await pool.workers[0].run_async(outer) == 14
