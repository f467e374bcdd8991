"""submit/run/map basics: results, errors, callables of every kind, placement.

On both hosts. On the process host calls, results and exceptions cross as pickles: the
tests here show what that keeps (types, the worker's traceback as the cause) and what
it turns into an error (a result or exception that cannot be pickled).
"""

from __future__ import annotations

import gc
import os
import threading
import traceback
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool, Worker, current_worker

from .helpers import event_set, loop_held

HOSTS = ("thread", "process", "ray")

MakePool = Callable[..., PortalPool[Any]]


async def double(value: int) -> int:
    await anyio.sleep(0)
    return value * 2


class Boom(Exception):
    pass


async def fail_deep() -> None:
    await anyio.sleep(0)
    raise Boom("from the worker")


def test_is_an_executor(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
    assert isinstance(pool, Executor)

    def consumer(executor: Executor) -> list[int]:
        # Code written against the Executor interface, unchanged.
        futures = [executor.submit(double, n) for n in range(10)]
        wait(futures)
        return [f.result() for f in futures] + list(executor.map(double, range(3)))

    assert consumer(pool) == [n * 2 for n in range(10)] + [0, 2, 4]


def test_coroutine_function_sync_callable_and_awaitable_factory(
    module_pool: PortalPool[Any], pool_host: str
) -> None:
    pool = module_pool

    def sync_add(a: int, b: int) -> tuple[int, str, int, int]:
        return a + b, threading.current_thread().name, current_worker().index, os.getpid()

    def returns_awaitable(value: int) -> Awaitable[int]:
        return double(value)

    total, thread_name, index, pid = pool.run(sync_add, 2, 3)
    assert total == 5
    assert thread_name.startswith("portal_pool-")  # ran in a worker's loop thread
    assert pid == pool.workers[index].pid  # in that worker's process
    assert (pid != os.getpid()) == (pool_host != "thread")
    assert pool.run(returns_awaitable, 21) == 42
    assert pool.submit(double, 4).result(timeout=10) == 8


def test_kwargs_pass_through(module_pool: PortalPool[Any]) -> None:
    pool = module_pool

    async def describe(a: int, /, *, sep: str, end: str = "!") -> str:
        return f"{a}{sep}{end}"

    assert pool.run(describe, 1, sep="-", end="?") == "1-?"
    assert pool.workers[1].run(describe, 2, sep="+") == "2+!"


def test_exception_keeps_type_and_traceback(module_pool: PortalPool[Any], pool_host: str) -> None:
    pool = module_pool
    future = pool.submit(fail_deep)
    with pytest.raises(Boom, match="from the worker") as info:
        future.result(timeout=10)
    assert type(info.value) is Boom
    if pool_host == "thread":
        frames = "".join(traceback.format_tb(info.value.__traceback__))
        assert "fail_deep" in frames
    else:
        # The worker's frames are in its process: its traceback comes back as text,
        # chained as the cause, as ProcessPoolExecutor does.
        cause = str(info.value.__cause__)
        assert "Traceback (most recent call last)" in cause
        assert "in fail_deep" in cause
        assert 'raise Boom("from the worker")' in cause
        printed = "".join(traceback.format_exception(info.value))
        assert "in fail_deep" in printed  # so a printed traceback shows where it failed
    with pytest.raises(Boom):
        pool.run(fail_deep)


@dataclass
class Point:
    x: int
    y: int


class CodedError(Exception):
    """An exception with state beyond its message, that pickles (its args are its
    __init__'s)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def make_point(x: int, y: int) -> Point:
    return Point(x, y)


async def raise_coded() -> None:
    await anyio.sleep(0)
    raise CodedError("coded", 7)


async def raise_key_error() -> None:
    raise KeyError("missing")


def append_one(items: list[int]) -> list[int]:
    items.append(1)
    return items


def test_arguments_and_results_are_the_callers_own_only_on_the_thread_host(
    module_pool: PortalPool[Any], pool_host: str
) -> None:
    mine: list[int] = []
    returned = module_pool.run(append_one, mine)
    assert returned == [1]
    if pool_host == "thread":  # the very objects, shared
        assert returned is mine
        assert mine == [1]
    else:  # copies both ways: the task changed its own
        assert returned is not mine
        assert mine == []


def test_results_and_exceptions_keep_their_types(module_pool: PortalPool[Any]) -> None:
    pool = module_pool

    class Local:  # by value to a worker process, and back as this very class
        def __init__(self, value: int) -> None:
            self.value = value

    def make_local(value: int) -> Local:
        return Local(value)

    point = pool.run(make_point, 1, 2)
    assert type(point) is Point
    assert point == Point(1, 2)
    assert pool.run(lambda: ({1, 2}, b"\0", (3.5, None))) == ({1, 2}, b"\0", (3.5, None))
    local = pool.run(make_local, 5)
    assert type(local) is Local
    assert local.value == 5
    with pytest.raises(CodedError, match="coded") as coded:
        pool.run(raise_coded)
    assert type(coded.value) is CodedError
    assert coded.value.code == 7
    with pytest.raises(KeyError, match="missing") as key_error:
        pool.run(raise_key_error)
    assert type(key_error.value) is KeyError


class LockedError(Exception):
    """Cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BadInit(Exception):
    """Pickles, but unpickling calls ``BadInit("boom")``, which lacks ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def return_a_lock() -> Any:
    return threading.Lock()


async def raise_locked_error() -> None:
    raise LockedError("stuck")


async def raise_bad_init() -> None:
    raise BadInit("boom", 3)


def test_unpicklable_result_or_exception(module_pool: PortalPool[Any], pool_host: str) -> None:
    pool = module_pool
    lock_future = pool.submit(return_a_lock)
    locked_future = pool.submit(raise_locked_error)
    bad_init_future = pool.submit(raise_bad_init)
    if pool_host == "thread":  # nothing is pickled: each is what the task gave
        assert type(lock_future.result(timeout=10)) is type(threading.Lock())
        assert type(locked_future.exception(timeout=10)) is LockedError
        assert type(bad_init_future.exception(timeout=10)) is BadInit
        return
    # Each becomes an error that names the type; none hangs, none is lost.
    with pytest.raises(
        TypeError,
        match=r"^the task's result, a _thread\.lock object, cannot be pickled to return it "
        r"from the worker process: cannot pickle '_thread\.lock' object",
    ):
        lock_future.result(timeout=10)
    with pytest.raises(
        TypeError,
        match=r"^the task raised an exception that cannot be pickled to return it from the "
        r"worker process: tests\.test_submit\.LockedError: stuck \(cannot pickle "
        r"'_thread\.lock' object\)",
    ) as locked:
        locked_future.result(timeout=10)
    assert "in raise_locked_error" in str(locked.value.__cause__)  # where it was raised
    with pytest.raises(
        TypeError,
        match=r"^the task raised an exception that could not be unpickled in the parent "
        r"process: tests\.test_submit\.BadInit: boom \(TypeError: .*'code'",
    ) as bad_init:
        bad_init_future.result(timeout=10)
    assert "in raise_bad_init" in str(bad_init.value.__cause__)
    assert pool.run(double, 5) == 10  # the worker serves on


class CustomBaseError(BaseException):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, GeneratorExit, CustomBaseError])
def test_base_exception_goes_to_its_future_only(
    module_pool: PortalPool[Any], shared: Any, error: type[BaseException]
) -> None:
    worker = module_pool.workers[0]
    started = shared.Event()
    release = shared.Event()

    async def bystander() -> str:
        started.set()
        await event_set(release)
        return "unharmed"

    async def raise_it() -> None:
        await anyio.sleep(0)
        raise error

    other = worker.submit(bystander)
    assert started.wait(10)
    with pytest.raises(error):
        worker.submit(raise_it).result(timeout=10)
    release.set()
    # The worker's loop survived, and so did the task running beside the failing one.
    assert other.result(timeout=10) == "unharmed"
    assert worker.run(double, 5) == 10


def test_round_robin_and_pinned_workers(make_pool: MakePool) -> None:
    pool = make_pool(3)

    def where() -> int:
        return current_worker().index

    assert len(pool.workers) == 3
    assert [pool.submit(where).result(timeout=10) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    for worker in pool.workers:
        assert isinstance(worker, Worker)
        assert worker.run(where) == worker.index
        assert worker.submit(where).result(timeout=10) == worker.index


def test_current_worker_outside_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a portal_pool worker"):
        current_worker()


@pytest.mark.hosts("thread")
def test_portal_is_usable_for_power_users(module_pool: PortalPool[Any]) -> None:
    worker = module_pool.workers[0]
    assert worker.portal.call(double, 3) == 6
    assert worker.portal.start_task_soon(double, 4).result(timeout=10) == 8


def portal_and_context_in_the_task() -> tuple[str, Any]:
    worker = current_worker()
    return type(worker.portal).__name__, worker.context


@pytest.mark.hosts("process", "ray")
def test_portal_and_context_live_in_the_worker_process(module_pool: PortalPool[Any]) -> None:
    worker = module_pool.workers[0]
    for name in ("portal", "context"):
        with pytest.raises(
            RuntimeError,
            match=rf"^worker 0's {name} lives in its process \(pid {worker.pid}\), not in "
            rf"this one; read current_worker\(\)\.{name} inside a task instead$",
        ):
            getattr(worker, name)
    # Where they are: in a task, in the worker's process.
    assert worker.run(portal_and_context_in_the_task) == ("BlockingPortal", None)


def test_submit_from_many_threads(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
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


def test_submit_never_waits_for_a_worker(module_pool: PortalPool[Any], shared: Any) -> None:
    pool = module_pool
    worker = pool.workers[0]
    big = bytes(8 << 20)  # more than a pipe holds, on the process host
    futures: list[Future[Any]] = []
    errors: list[BaseException] = []

    def submitter() -> None:
        try:
            futures.extend(worker.submit(double, n) for n in range(200))
            futures.extend(worker.submit(len, big) for _ in range(3))
            futures.extend(pool.submit(double, n) for n in range(10))
        except BaseException as exc:
            errors.append(exc)

    with loop_held(worker.submit, shared) as holder:
        # The worker's loop is blocked by a sync call, until the block ends: a submit
        # that waited for the worker would never return.
        thread = threading.Thread(target=submitter)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "submit waited for the worker's blocked loop"
        assert not errors
        assert not holder.done()
        assert not any(future.done() for future in futures[:203])
    assert [f.result(timeout=30) for f in futures[:200]] == [2 * n for n in range(200)]
    assert [f.result(timeout=30) for f in futures[200:203]] == [len(big)] * 3
    assert [f.result(timeout=30) for f in futures[203:]] == [2 * n for n in range(10)]


class Payload:
    pass


# A worker's weak references to what its task got and made (in its process).
_remembered: list[weakref.ref[Payload]] = []


async def consume_and_remember(item: Payload) -> Payload:
    produced = Payload()
    _remembered[:] = [weakref.ref(item), weakref.ref(produced)]
    return produced


def forgotten() -> list[bool]:
    """Whether the objects that consume_and_remember saw in this worker are gone."""
    gc.collect()
    return [ref() is None for ref in _remembered]


def test_finished_task_releases_callable_arguments_and_result(
    module_pool: PortalPool[Any],
) -> None:
    # In the parent, and on the thread host in the worker too: the pool keeps nothing.
    worker = module_pool.workers[0]
    result_holder: list[weakref.ref[Payload]] = []

    async def consume(item: Payload) -> Payload:
        produced = Payload()
        result_holder.append(weakref.ref(produced))
        return produced

    argument = Payload()
    argument_ref = weakref.ref(argument)
    future = worker.submit(consume, argument)
    del argument
    produced = future.result(timeout=10)
    produced_ref = weakref.ref(produced)  # the parent's copy, on the process host
    del produced, future
    worker.run(lambda: None)  # orders us after the worker's last touch of the task
    gc.collect()
    assert argument_ref() is None
    assert produced_ref() is None
    for ref in result_holder:  # filled on the thread host only: the process's is a copy
        assert ref() is None


def test_worker_releases_arguments_and_result(module_pool: PortalPool[Any]) -> None:
    # In the worker, wherever it runs: its task's argument and result are dropped once
    # the outcome is sent.
    worker = module_pool.workers[0]
    assert type(worker.run(consume_and_remember, Payload())) is Payload
    assert worker.run(forgotten) == [True, True]


def test_max_workers(make_pool: MakePool) -> None:
    assert len(make_pool(1).workers) == 1  # and 3 in test_round_robin_and_pinned_workers


def test_default_max_workers_is_cpu_count(backend_kwargs: dict[str, Any]) -> None:
    expected = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    with PortalPool(**backend_kwargs) as pool:
        assert len(pool.workers) == expected
