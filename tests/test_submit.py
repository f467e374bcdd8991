"""submit/run/map basics: results, errors, callables of every kind, placement."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, wait
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool, Worker, current_worker

MakePool = Callable[..., PortalPool[Any]]


async def double(value: int) -> int:
    await anyio.sleep(0)
    return value * 2


class Boom(Exception):
    pass


async def fail_deep() -> None:
    await anyio.sleep(0)
    raise Boom("from the worker")


def test_is_an_executor(make_pool: MakePool) -> None:
    pool = make_pool()
    assert isinstance(pool, Executor)

    def consumer(executor: Executor) -> list[int]:
        # Code written against the Executor interface, unchanged.
        futures = [executor.submit(double, n) for n in range(10)]
        wait(futures)
        return [f.result() for f in futures] + list(executor.map(double, range(3)))

    assert consumer(pool) == [n * 2 for n in range(10)] + [0, 2, 4]


def test_coroutine_function_sync_callable_and_awaitable_factory(make_pool: MakePool) -> None:
    pool = make_pool()

    def sync_add(a: int, b: int) -> tuple[int, str]:
        return a + b, threading.current_thread().name

    def returns_awaitable(value: int) -> Awaitable[int]:
        return double(value)

    total, thread_name = pool.run(sync_add, 2, 3)
    assert total == 5
    assert thread_name.startswith("portal_pool-")  # ran in a worker's loop thread
    assert pool.run(returns_awaitable, 21) == 42
    assert pool.submit(double, 4).result(timeout=10) == 8


def test_kwargs_pass_through(make_pool: MakePool) -> None:
    pool = make_pool()

    async def describe(a: int, /, *, sep: str, end: str = "!") -> str:
        return f"{a}{sep}{end}"

    assert pool.run(describe, 1, sep="-", end="?") == "1-?"
    assert pool.workers[1].run(describe, 2, sep="+") == "2+!"


def test_exception_keeps_type_and_traceback(make_pool: MakePool) -> None:
    pool = make_pool()
    future = pool.submit(fail_deep)
    with pytest.raises(Boom, match="from the worker") as info:
        future.result(timeout=10)
    frames = "".join(traceback.format_tb(info.value.__traceback__))
    assert "fail_deep" in frames
    with pytest.raises(Boom):
        pool.run(fail_deep)


class CustomBaseError(BaseException):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, GeneratorExit, CustomBaseError])
def test_base_exception_goes_to_its_future_only(
    make_pool: MakePool, error: type[BaseException]
) -> None:
    pool = make_pool(1)
    started = threading.Event()

    async def bystander() -> str:
        started.set()
        await anyio.sleep(0.05)
        return "unharmed"

    async def raise_it() -> None:
        await anyio.sleep(0)
        raise error

    other = pool.submit(bystander)
    assert started.wait(10)
    with pytest.raises(error):
        pool.submit(raise_it).result(timeout=10)
    # The worker's loop survived, and so did the task running beside the failing one.
    assert other.result(timeout=10) == "unharmed"
    assert pool.run(double, 5) == 10


def test_round_robin_and_pinned_workers(make_pool: MakePool) -> None:
    pool = make_pool(3)

    def where() -> int:
        return current_worker().index

    assert [pool.submit(where).result(timeout=10) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    for worker in pool.workers:
        assert isinstance(worker, Worker)
        assert worker.run(where) == worker.index
        assert worker.submit(where).result(timeout=10) == worker.index


def test_current_worker_outside_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a portal_pool worker"):
        current_worker()


def test_portal_is_usable_for_power_users(make_pool: MakePool) -> None:
    pool = make_pool(1)
    worker = pool.workers[0]
    assert worker.portal.call(double, 3) == 6
    assert worker.portal.start_task_soon(double, 4).result(timeout=10) == 8


def test_submit_from_many_threads(make_pool: MakePool) -> None:
    pool = make_pool(2)
    results: list[Future[int]] = []
    lock = threading.Lock()

    def producer(offset: int) -> None:
        local = [pool.submit(double, offset + n) for n in range(500)]
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=producer, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = sorted(f.result(timeout=30) for f in results)
    assert values == sorted(2 * (k * 1000 + n) for k in range(4) for n in range(500))


def test_finished_task_releases_callable_arguments_and_result(make_pool: MakePool) -> None:
    import gc
    import weakref

    pool = make_pool(1)

    class Payload:
        pass

    argument = Payload()
    argument_ref = weakref.ref(argument)
    result_holder: list[weakref.ref[Payload]] = []

    async def consume(item: Payload) -> Payload:
        produced = Payload()
        result_holder.append(weakref.ref(produced))
        return produced

    future = pool.submit(consume, argument)
    del argument
    produced = future.result(timeout=10)
    del produced, future
    pool.run(lambda: None)  # orders us after the worker's last touch of the task
    gc.collect()
    assert argument_ref() is None
    assert result_holder[0]() is None


@pytest.mark.parametrize("workers", [1, 3])
def test_max_workers(make_pool: MakePool, workers: int) -> None:
    assert len(make_pool(workers).workers) == workers


def test_default_max_workers_is_cpu_count(backend_kwargs: dict[str, Any]) -> None:
    import os

    expected = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    with PortalPool(**backend_kwargs) as pool:
        assert len(pool.workers) == expected
