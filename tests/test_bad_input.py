"""Bad input: each case gets a clear error, and nothing already submitted is lost."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from portal_pool import BrokenPortalPool, PortalPool

from .helpers import event_set

HOSTS = ("thread", "process", "ray")


def counts(pool: PortalPool[Any]) -> tuple[int, ...]:
    """What a call that is refused must not change."""
    stats = pool.stats()
    return stats.completed, stats.failed, stats.cancelled, stats.pending


@pytest.mark.parametrize("workers", [0, -1])
def test_max_workers_must_be_positive(workers: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        PortalPool(workers)


def test_unknown_backend_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'asyncio' or 'trio'"):
        PortalPool(1, backend="curio")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_unknown_backend_option_names_the_valid_ones(backend: str) -> None:
    if backend == "trio":
        pytest.importorskip("trio")
    with pytest.raises(ValueError, match=r"unknown backend_options \['use_uvlop'\].*valid"):
        PortalPool(1, backend=backend, backend_options={"use_uvlop": True})


def test_not_callable_is_rejected_by_submit(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
    with pytest.raises(TypeError, match="expected a callable"):
        pool.submit(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="expected a callable"):
        pool.map(42, [1])  # type: ignore[arg-type]


def test_coroutine_object_is_rejected_and_closed(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
    kept = pool.submit(anyio.sleep, 0)

    async def fetch(url: str) -> str:
        return url

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "never awaited" RuntimeWarning would fail here
        coroutine = fetch("x")
        with pytest.raises(TypeError, match=r"submit\(fetch, arg\) rather than submit\(fetch"):
            pool.submit(coroutine)  # type: ignore[call-overload]
        assert coroutine.cr_frame is None  # closed
    assert kept.result(timeout=10) is None  # earlier work is unaffected


def test_a_running_coroutine_is_rejected_and_left_alone(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
    errors: list[BaseException] = []

    async def submits_itself() -> None:
        try:
            pool.submit(coroutine)  # type: ignore[call-overload]
        except BaseException as exc:
            errors.append(exc)

    coroutine = submits_itself()
    with pytest.raises(StopIteration):
        coroutine.send(None)  # driven by hand: running while it calls submit
    assert len(errors) == 1
    assert isinstance(errors[0], TypeError)  # not the ValueError of closing a running one
    assert "coroutine object" in str(errors[0])


async def numbers(count: int) -> AsyncIterator[int]:
    for number in range(count):
        yield number


class Feed:
    async def items(self) -> AsyncIterator[int]:
        yield 1


# Each of these, called, returns an async generator: a task would return it unrun.
ASYNC_GENERATOR_FUNCTIONS = {
    "function": numbers,
    "partial": partial(numbers, 3),
    "bound method": Feed().items,
    "partial of a method": partial(Feed().items),
}
AGEN_ERROR = r"is an async generator function.*coroutine function that iterates it"


@pytest.mark.parametrize("fn", ASYNC_GENERATOR_FUNCTIONS.values(), ids=ASYNC_GENERATOR_FUNCTIONS)
def test_async_generator_function_is_rejected(module_pool: PortalPool[Any], fn: Any) -> None:
    pool = module_pool
    worker = pool.workers[0]
    before = counts(pool)
    calls: list[Callable[[], object]] = [
        lambda: pool.submit(fn),
        lambda: pool.run(fn),
        lambda: worker.submit(fn),
        lambda: worker.run(fn),
        lambda: pool.map(fn, [1]),
        lambda: pool.map(fn, [1], chunksize=2),
        lambda: pool.map_unordered(fn, [1]),
        lambda: pool.map_async(fn, [1]),
        lambda: pool.map_unordered_async(fn, [1]),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=AGEN_ERROR):
            call()
    assert counts(pool) == before  # nothing was queued


@pytest.mark.anyio
@pytest.mark.parametrize("fn", ASYNC_GENERATOR_FUNCTIONS.values(), ids=ASYNC_GENERATOR_FUNCTIONS)
async def test_async_generator_function_is_rejected_by_run_async(
    module_pool: PortalPool[Any], fn: Any
) -> None:
    pool = module_pool
    before = counts(pool)
    with pytest.raises(TypeError, match=AGEN_ERROR):
        await pool.run_async(fn)
    with pytest.raises(TypeError, match=AGEN_ERROR):
        await pool.workers[0].run_async(fn)
    assert counts(pool) == before


def test_async_generator_object_is_rejected(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
    before = counts(pool)
    generator = numbers(3)
    with pytest.raises(TypeError, match=r"async generator object.*async for x in numbers"):
        pool.submit(generator)  # type: ignore[call-overload]
    assert counts(pool) == before


def test_worker_context_failure_breaks_the_pool_and_leaves_no_thread(
    backend_kwargs: dict[str, Any], shared: Any
) -> None:
    entered: list[int] = shared.list()
    exited: list[int] = shared.list()
    lock = shared.Lock()

    @asynccontextmanager
    async def flaky() -> AsyncIterator[None]:
        with lock:  # one worker enters; the others, in parallel, fail
            if entered:
                raise ConnectionError("database unreachable")
            entered.append(1)
        try:
            yield
        finally:
            exited.append(1)

    before = set(threading.enumerate())
    with pytest.raises(BrokenPortalPool, match="database unreachable") as info:
        PortalPool(3, worker_context=flaky, **backend_kwargs)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert set(threading.enumerate()) <= before
    assert list(entered) == list(exited) == [1]  # the worker that did start was unwound


class Abort(BaseException):
    pass


@pytest.mark.parametrize(
    "error", [Abort, KeyboardInterrupt, SystemExit, asyncio.CancelledError], ids=repr
)
def test_worker_context_base_exception_is_the_workers_failure(
    backend_kwargs: dict[str, Any], error: type[BaseException]
) -> None:
    @asynccontextmanager
    async def raising() -> AsyncIterator[None]:
        raise error("raised by the worker_context")
        yield

    before = set(threading.enumerate())
    # Not re-raised as is: a CancelledError or KeyboardInterrupt here would look like the
    # caller's own cancellation or Ctrl-C.
    with pytest.raises(BrokenPortalPool, match="raised by the worker_context") as info:
        PortalPool(2, worker_context=raising, **backend_kwargs)
    assert type(info.value.__cause__) is error
    assert set(threading.enumerate()) <= before


class Unprintable(Exception):
    """An error whose repr() and str() fail, as a broken third-party exception's can."""

    def __repr__(self) -> str:
        raise RuntimeError("repr() of the error failed")

    __str__ = __repr__


def test_worker_context_error_whose_repr_fails(backend_kwargs: dict[str, Any]) -> None:
    @asynccontextmanager
    async def unprintable() -> AsyncIterator[None]:
        raise Unprintable
        yield

    before = set(threading.enumerate())
    with pytest.raises(
        BrokenPortalPool, match=r"<Unprintable object, whose repr\(\) failed>"
    ) as info:
        PortalPool(2, worker_context=unprintable, **backend_kwargs)
    assert isinstance(info.value.__cause__, Unprintable)
    assert set(threading.enumerate()) <= before


def test_worker_context_not_an_async_context_manager(backend_kwargs: dict[str, Any]) -> None:
    with pytest.raises(BrokenPortalPool, match="asynccontextmanager"):
        PortalPool(1, worker_context=lambda: "not a manager", **backend_kwargs)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="worker_context must be"):
        PortalPool(1, worker_context="nope", **backend_kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(
    importlib.util.find_spec("trio") is not None, reason="needs an environment without trio"
)
def test_trio_backend_without_trio_says_what_to_install() -> None:
    with pytest.raises(ImportError, match=r"pip install 'portal_pool\[trio\]'"):
        PortalPool(1, backend="trio")


def test_missing_backend_package_message() -> None:
    # Hide trio and uvloop from a fresh interpreter to check the message on any machine.
    code = (
        "import sys\n"
        "sys.modules['trio'] = None\n"
        "sys.modules['uvloop'] = None\n"
        "from portal_pool import PortalPool\n"
        "for kwargs in ({'backend': 'trio'}, {'backend_options': {'use_uvloop': True}}):\n"
        "    try:\n"
        "        PortalPool(1, **kwargs)\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "pip install 'portal_pool[trio]'" in output
    assert "pip install 'portal_pool[uvloop]'" in output


def test_run_async_without_an_event_loop_is_explained(module_pool: PortalPool[Any]) -> None:
    pool = module_pool
    # A coroutine driven by hand from sync code has no event loop behind it.
    coroutine = pool.run_async(anyio.sleep, 0)
    with pytest.raises(RuntimeError, match="call run\\(\\) or submit\\(\\) instead"):
        coroutine.send(None)


# -- what cannot be sent to a worker process ---------------------------------------------


def describe(*args: Any, **kwargs: Any) -> str:
    return f"{len(args)} {sorted(kwargs)}"


def unsendable(what: str, of_type: str) -> str:
    """The whole message of the TypeError that ``submit`` raises on the process host."""
    return re.escape(
        f"cannot send {what} to a worker process: {of_type} cannot be pickled (cannot pickle "
        "'_thread.lock' object); pass data that can be pickled, or create the object inside "
        "the task"
    )


def test_unpicklable_call_raises_from_submit_and_loses_nothing(
    module_pool: PortalPool[Any], shared: Any, pool_host: str
) -> None:
    pool = module_pool
    lock = threading.Lock()

    def holds_lock() -> bool:  # a closure over a lock: by value, it can't be pickled
        return lock.locked()

    # Work already submitted, running and queued on both workers: none of it is lost.
    release = shared.Event()

    async def held(n: int) -> int:
        await event_set(release)
        return n

    earlier = [pool.submit(held, n) for n in range(6)]
    calls: list[tuple[str, str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
        ("the callable", "a function object", holds_lock, (), {}),
        ("args[1]", "a _thread.lock object", describe, (1, lock), {}),
        ("kwargs['timeout']", "a _thread.lock object", describe, (1,), {"timeout": lock}),
    ]
    worker = pool.workers[1]
    for what, of_type, fn, args, kwargs in calls:
        for submit in (pool.submit, worker.submit):
            if pool_host == "thread":  # nothing is pickled: the same call runs
                assert submit(fn, *args, **kwargs).result(timeout=10) is not None
                continue
            with pytest.raises(TypeError, match=f"^{unsendable(what, of_type)}$") as info:
                submit(fn, *args, **kwargs)
            # The pickling error itself, as the cause.
            assert isinstance(info.value.__cause__, TypeError)
            assert "cannot pickle '_thread.lock' object" in str(info.value.__cause__)
        if pool_host != "thread":  # run() raises it at once too, before any wait
            for run in (pool.run, worker.run):
                with pytest.raises(TypeError, match=f"^{unsendable(what, of_type)}$"):
                    run(fn, *args, **kwargs)
    assert not any(future.done() for future in earlier)
    release.set()
    assert [future.result(timeout=10) for future in earlier] == list(range(6))
    assert pool.run(describe, 1, x=2) == "1 ['x']"


@pytest.mark.hosts("process", "ray")
def test_unpicklable_map_raises_at_the_call_or_at_the_next_that_submits_it(
    module_pool: PortalPool[Any],
) -> None:
    pool = module_pool
    lock = threading.Lock()
    item = unsendable("args[0]", "a _thread.lock object")
    earlier = pool.submit(describe, 1)
    # The first window is submitted by the call itself: that is where it raises.
    with pytest.raises(TypeError, match=unsendable("the callable", "a function object")):
        pool.map(lambda x: lock, [1])
    for map_method in (pool.map, pool.map_unordered):
        with pytest.raises(TypeError, match=item):
            map_method(describe, [1, lock])
    # Beyond a bounded window, from the next() that submits it.
    results = pool.map(describe, [1, 2, lock, 4], buffersize=1)
    assert next(results) == "1 []"
    with pytest.raises(TypeError, match=item):
        next(results)
    assert earlier.result(timeout=10) == "1 []"


@pytest.mark.hosts("process", "ray")
def test_unpicklable_chunked_map_raises_at_the_call(module_pool: PortalPool[Any]) -> None:
    # A chunk is one call of the backend's chunk runner: the message still names the
    # item (by its place in the chunk and its argument) or the callable, as
    # map(chunksize=1) does, not the chunk as a whole.
    lock = threading.Lock()
    item = "item 1 of a map chunk: " + unsendable("args[0]", "a _thread.lock object")
    with pytest.raises(TypeError, match=f"^{item}$") as info:
        module_pool.map(describe, [1, lock], chunksize=2)
    assert "cannot pickle '_thread.lock' object" in str(info.value.__cause__)
    second = "item 1 of a map chunk: " + unsendable("args[1]", "a _thread.lock object")
    with pytest.raises(TypeError, match=f"^{second}$"):
        module_pool.map(describe, [1, 2], [3, lock], chunksize=2)

    def holds_a_lock(x: int, held: Any = lock) -> int:
        return x

    with pytest.raises(TypeError, match=r"^cannot send the callable to a worker process"):
        module_pool.map(holds_a_lock, [1, 2], chunksize=2)


@pytest.mark.anyio
async def test_unpicklable_call_from_async_callers(
    module_pool: PortalPool[Any], pool_host: str
) -> None:
    pool = module_pool
    lock = threading.Lock()
    if pool_host == "thread":  # nothing is pickled: the same call runs
        assert await pool.run_async(describe, lock) == "1 []"
        return
    with pytest.raises(TypeError, match=unsendable("args[0]", "a _thread.lock object")):
        await pool.run_async(describe, lock)
    with pytest.raises(TypeError, match=unsendable("kwargs['k']", "a _thread.lock object")):
        await pool.workers[1].run_async(describe, k=lock)
    # An async iterator submits nothing before it is iterated: it raises there.
    for map_method in (pool.map_async, pool.map_unordered_async):
        results = map_method(describe, [1, lock])
        with pytest.raises(TypeError, match=unsendable("args[0]", "a _thread.lock object")):
            async for _ in results:
                pass
    assert await pool.run_async(describe, 1) == "1 []"


def number_of_workers(pool: PortalPool[Any]) -> int:
    return len(pool.workers)


def test_a_pool_cannot_be_sent_to_a_worker(module_pool: PortalPool[Any], pool_host: str) -> None:
    pool = module_pool
    if pool_host == "thread":  # the task gets the pool itself
        assert pool.submit(number_of_workers, pool).result(timeout=10) == 2
        return
    with pytest.raises(TypeError, match="a PortalPool cannot be sent to a worker") as info:
        pool.submit(number_of_workers, pool)
    assert str(info.value).startswith(
        "cannot send args[0] to a worker process: a portal_pool._pool.PortalPool object"
    )
    # Nor in a closure: a task that would use the pool from inside a worker.
    with pytest.raises(TypeError, match="a PortalPool cannot be sent to a worker"):
        pool.submit(lambda: pool.stats())
    with pytest.raises(TypeError, match="a Worker cannot be sent to a worker process"):
        pool.submit(describe, pool.workers[0])
