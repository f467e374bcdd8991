"""run_async and ``async with`` from asyncio and trio callers, on every pool backend and
both hosts, with cancellation both ways: a cancelled caller cancels its task in the
worker (in the worker's process, on the process host), and a task cancelled in the
worker fails its caller's await without cancelling the caller."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .helpers import event_set

HOSTS = ("thread", "process", "ray")

MakePool = Callable[..., PortalPool[Any]]

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


async def double(n: int) -> int:
    await anyio.sleep(0)
    return n * 2


async def test_run_async_returns_and_raises(module_pool: PortalPool[Any]) -> None:
    pool = module_pool

    async def fail() -> None:
        raise Boom("worker side")

    assert await pool.run_async(double, 21) == 42
    assert await pool.run_async(lambda: "sync") == "sync"
    with pytest.raises(Boom, match="worker side") as info:
        await pool.run_async(fail)
    assert type(info.value) is Boom
    results: list[int] = []

    async def call(n: int) -> None:
        results.append(await pool.run_async(double, n))

    async with anyio.create_task_group() as group:
        for n in range(20):
            group.start_soon(call, n)
    assert sorted(results) == [2 * n for n in range(20)]


async def test_run_async_does_not_block_the_caller_loop(
    module_pool: PortalPool[Any], shared: Any
) -> None:
    gate = shared.Event()
    entered = shared.Event()

    async def hold() -> str:
        entered.set()
        await event_set(gate)  # fails unless the caller's loop sets it meanwhile
        return "released"

    results: list[str] = []
    async with anyio.create_task_group() as group:

        async def call() -> None:
            results.append(await module_pool.run_async(hold))

        group.start_soon(call)
        # The caller's loop keeps running while the worker holds the task.
        await event_set(entered)
        await anyio.sleep(0)
        gate.set()
    assert results == ["released"]


async def test_cancelling_the_caller_cancels_the_worker_task(
    module_pool: PortalPool[Any], shared: Any
) -> None:
    worker = module_pool.workers[0]
    started = shared.Event()
    cleanup_finished = shared.Event()
    cleaned_up_in: list[int] = shared.list()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
            cleaned_up_in.append(os.getpid())
            cleanup_finished.set()

    with anyio.CancelScope() as scope:

        async def cancel_when_started() -> None:
            await event_set(started)
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(cancel_when_started)
            await worker.run_async(sleeper)
    assert scope.cancelled_caught
    # run_async returned only after the worker task had finished its cleanup, in the
    # worker's loop (its process's, on the process host).
    assert cleanup_finished.is_set()
    assert list(cleaned_up_in) == [worker.pid]


async def test_a_task_cancelled_in_the_worker_fails_its_caller(
    make_pool: MakePool, shared: Any
) -> None:
    pool = make_pool(1)
    started = shared.Event()
    cleaned_up = shared.Event()

    async def sleeper() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    async def cancel_the_work_when_started() -> None:
        await event_set(started)
        pool.shutdown(wait=False, cancel_futures=True)

    async with anyio.create_task_group() as group:
        group.start_soon(cancel_the_work_when_started)
        with pytest.raises(CancelledError) as info:
            await pool.run_async(sleeper)
    # concurrent.futures' CancelledError, an ordinary exception: not the caller's own
    # cancellation, which it would be with asyncio's or trio's.
    assert type(info.value) is CancelledError
    assert cleaned_up.is_set()  # raised once the task's clean-up had ended
    await anyio.sleep(0)  # a checkpoint, where a cancelled caller would stop


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


async def test_async_with_error_cancels_remaining_work(
    backend_kwargs: dict[str, Any], shared: Any
) -> None:
    started = shared.Event()
    cleaned_up = shared.Event()

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    with pytest.raises(Boom):
        async with PortalPool(1, **backend_kwargs) as pool:
            future = pool.submit(forever)
            await event_set(started)
            raise Boom
    assert future.cancelled()
    assert cleaned_up.is_set()  # the block's exit waited for the clean-up


async def test_run_async_after_shutdown_raises(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        await pool.run_async(anyio.sleep, 0)


@pytest.mark.hosts("thread")
async def test_run_async_from_inside_a_worker(module_pool: PortalPool[Any]) -> None:
    pool = module_pool

    async def inner() -> int:
        return 7

    async def outer() -> int:
        # Nested use from a worker: async, so no deadlock even on the same worker.
        return await pool.workers[0].run_async(inner) + await pool.workers[1].run_async(inner)

    assert await pool.workers[0].run_async(outer) == 14


@pytest.mark.hosts("process", "ray")
async def test_a_task_in_a_worker_process_cannot_use_the_pool(
    module_pool: PortalPool[Any],
) -> None:
    pool = module_pool

    async def outer() -> int:
        return await pool.workers[1].run_async(double, 7)

    # The task would need the pool in the worker's process: refused as it is sent.
    with pytest.raises(TypeError, match="a PortalPool cannot be sent to a worker"):
        await pool.workers[0].run_async(outer)
