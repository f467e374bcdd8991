"""map: order, chunks, the bounded window, timeouts, early exit and memory.

On both hosts. Most tests share one two-worker pool per backend and host (``pool``);
the ones about a pool's own life make their own.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .conftest import POOL_BACKENDS, host_for
from .helpers import CountingSource, wait_until

MakePool = Callable[..., PortalPool[Any]]

HOSTS = ("thread", "process", "ray")


@pytest.fixture(scope="module")
def _shared_pools(
    request: pytest.FixtureRequest,
) -> Iterator[dict[tuple[str, str], PortalPool[Any]]]:
    """One two-worker pool per backend and host, for the module's tests that use ``pool``.

    Only those that the selected tests use are started, all at once: a module-scoped
    fixture is set up before the first test's leak checks, which would otherwise count
    the pool's threads and processes as that test's.
    """
    wanted = sorted(
        {
            (str(item.callspec.params["pool_backend"]), str(item.callspec.params["pool_host"]))
            for item in request.session.items
            if isinstance(item, pytest.Function)
            and item.module is request.module
            and "pool" in item.fixturenames
        }
    )
    pools: dict[tuple[str, str], PortalPool[Any]] = {}
    try:
        for backend, host in wanted:
            name, options, _ = POOL_BACKENDS[backend]
            pools[backend, host] = PortalPool(
                2, backend=name, backend_options=options, host=host_for(host, request)
            )
        yield pools
    finally:
        for shared_pool in pools.values():
            shared_pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def pool(
    _shared_pools: dict[tuple[str, str], PortalPool[Any]], pool_backend: str, pool_host: str
) -> PortalPool[Any]:
    """The module's two-worker pool on the test's backend and host: never shut it down."""
    return _shared_pools[pool_backend, pool_host]


@pytest.fixture
def submitted(pool: PortalPool[Any], monkeypatch: pytest.MonkeyPatch) -> list[Future[Any]]:
    """Every future that ``pool.submit`` returns during the test (the sync maps call it)."""
    futures: list[Future[Any]] = []
    submit = pool.submit

    def recording_submit(fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future = submit(fn, *args)
        futures.append(future)
        return future

    monkeypatch.setattr(pool, "submit", recording_submit)
    return futures


async def square(n: int) -> int:
    await anyio.sleep(0)
    return n * n


class Item:
    """A result that can be weakly referenced (and pickled, for the process host)."""


def make_item(n: int) -> Item:
    return Item()


def noop() -> None:
    pass


class Blocking:
    """A task body that waits until cancelled; counts the tasks that started and ended,
    and records the items of those that ended (``shared``: seen from a worker process).
    """

    def __init__(self, shared: Any) -> None:
        self.started = shared.Semaphore(0)
        self.ended = shared.Semaphore(0)
        self.ended_items = shared.list()

    async def __call__(self, n: int) -> int:
        try:
            self.started.release()
            await anyio.sleep(3600)
        finally:
            self.ended_items.append(n)
            self.ended.release()
        return n

    def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert self.started.acquire(timeout=10), "a task never started"

    def wait_ended(self, count: int) -> None:
        for _ in range(count):
            assert self.ended.acquire(timeout=10), "a task kept running: nothing cancelled it"


@pytest.mark.parametrize("chunksize", [1, 3, 512])
def test_results_in_input_order(pool: PortalPool[Any], chunksize: int) -> None:
    assert list(pool.map(square, range(100), chunksize=chunksize)) == [n * n for n in range(100)]


def test_several_iterables_and_sync_functions(pool: PortalPool[Any]) -> None:
    assert list(pool.map(pow, [2, 3, 4], [3, 2, 1], chunksize=2)) == [8, 9, 4]
    assert list(pool.map(lambda a, b: a + b, "abc", "xyz")) == ["ax", "by", "cz"]


@pytest.mark.parametrize("kind", ["map", "chunked", "unordered", "async", "async unordered"])
def test_closures_and_lambdas_as_the_function(
    pool: PortalPool[Any], shared: Any, kind: str
) -> None:
    """A closure over local values, and one over a shared list, both run (on the process
    host they go by value); a lambda was seen above."""
    offset = 100
    seen = shared.list()

    async def add_offset(n: int) -> int:
        seen.append(n)
        await anyio.sleep(0)
        return n + offset

    if kind.startswith("async"):
        maps = pool.map_unordered_async if "unordered" in kind else pool.map_async

        async def collect() -> list[int]:
            return [result async for result in maps(add_offset, range(10), buffersize=3)]

        results = anyio.run(collect)
    elif kind == "unordered":
        results = list(pool.map_unordered(add_offset, range(10)))
    else:
        results = list(pool.map(add_offset, range(10), chunksize=3 if kind == "chunked" else 1))
    if "unordered" in kind:
        results.sort()
    assert results == list(range(100, 110))
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("chunksize", [1, 4])
def test_error_raised_at_its_position(pool: PortalPool[Any], chunksize: int) -> None:
    async def check(n: int) -> int:
        if n == 5:
            raise ValueError(n)
        return n

    results = pool.map(check, range(10), chunksize=chunksize)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="5"):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_buffersize_reads_input_lazily(pool: PortalPool[Any], chunksize: int) -> None:
    source = CountingSource(1000)

    results = pool.map(square, source, buffersize=3, chunksize=chunksize)
    assert source.consumed == 3 * chunksize  # the first window is submitted eagerly
    assert next(results) == 0
    assert source.consumed <= 4 * chunksize  # one more unit per result taken
    assert list(results) == [n * n for n in range(1, 1000)]


@pytest.mark.parametrize("buffersize", [None, 3])
def test_unordered_yields_every_result(pool: PortalPool[Any], buffersize: int | None) -> None:
    source = CountingSource(50)
    results = pool.map_unordered(square, source, buffersize=buffersize)
    assert source.consumed == (50 if buffersize is None else buffersize)
    assert sorted(results) == [n * n for n in range(50)]


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("buffersize", [None, 2])
async def test_async_maps_yield_every_result(
    pool: PortalPool[Any], ordered: bool, buffersize: int | None
) -> None:
    source = CountingSource(30)
    maps = pool.map_async if ordered else pool.map_unordered_async
    async with aclosing(maps(square, source, buffersize=buffersize)) as results:
        collected = [result async for result in results]
    expected = [n * n for n in range(30)]
    assert (collected if ordered else sorted(collected)) == expected


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_leaving_early_cancels_outstanding_work(
    pool: PortalPool[Any], shared: Any, ordered: bool
) -> None:
    blocking = Blocking(shared)

    async def first_fast(n: int) -> int:
        return n if n == 0 else await blocking(n)

    maps = pool.map if ordered else pool.map_unordered
    results = maps(first_fast, range(5), buffersize=4)
    assert next(results) == 0  # taking it submits item 4: items 1-4 are now in flight
    blocking.wait_started(4)
    results.close()  # what a `break` out of a for loop does, at the generator's collection
    blocking.wait_ended(4)
    assert sorted(blocking.ended_items) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("chunksize", "buffersize"),
    # Each first window holds all four items: the first next() submits no more, which
    # could start or not before the timeout cancels it.
    [(1, None), (2, None), (1, 4), (2, 2)],
    ids=["items", "chunks", "buffered items", "buffered chunks"],
)
def test_timeout_raises_and_cancels(
    pool: PortalPool[Any], shared: Any, chunksize: int, buffersize: int | None
) -> None:
    blocking = Blocking(shared)
    results = pool.map(blocking, range(4), timeout=0.05, chunksize=chunksize, buffersize=buffersize)
    blocking.wait_started(4)  # the deadline may pass meanwhile: next() raises at once
    with pytest.raises(FutureTimeout):
        next(results)
    blocking.wait_ended(4)
    assert sorted(blocking.ended_items) == [0, 1, 2, 3]


def test_iterator_keeps_no_reference_to_yielded_results(pool: PortalPool[Any]) -> None:
    for chunksize in (1, 4):
        results = pool.map(make_item, range(8), chunksize=chunksize)
        first = next(results)
        assert isinstance(first, Item)
        ref = weakref.ref(first)
        del first
        # On the thread host, a worker drops its last reference right after it resolves
        # the future; a round trip through every worker orders us after that.
        for worker in pool.workers:
            worker.run(noop)
        gc.collect()
        assert ref() is None
        assert len(list(results)) == 7


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"buffersize": 0}, ValueError, "buffersize"),
        ({"buffersize": 1.5}, TypeError, "buffersize"),
        ({"timeout": -1}, ValueError, "timeout"),
    ],
)
def test_bad_arguments(
    pool: PortalPool[Any], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        pool.map(square, range(3), **kwargs)


# The sync maps, which submit their first window when called (as Executor.map does):
# how to call each, and how many units of work (items or chunks) it then submits.
EAGER_MAPS: dict[
    str, tuple[Callable[[PortalPool[Any], Callable[[int], Any], Iterable[int]], Iterator[Any]], int]
] = {
    "ordered": (lambda pool, fn, items: pool.map(fn, items), 6),
    "chunked": (lambda pool, fn, items: pool.map(fn, items, chunksize=2), 3),
    "buffered": (lambda pool, fn, items: pool.map(fn, items, buffersize=4), 4),
    "chunked buffered": (lambda pool, fn, items: pool.map(fn, items, chunksize=2, buffersize=2), 2),
    "unordered": (lambda pool, fn, items: pool.map_unordered(fn, items), 6),
    "unordered buffered": (lambda pool, fn, items: pool.map_unordered(fn, items, buffersize=4), 4),
}


def _items_of(kind: str, units: int) -> int:
    """How many items the first ``units`` units of work of that map hold."""
    return units * 2 if kind.startswith("chunked") else units


@pytest.mark.parametrize("kind", [kind for kind in EAGER_MAPS if kind.startswith("unordered")])
def test_dropping_the_iterator_before_its_first_next_cancels_its_work(
    pool: PortalPool[Any], shared: Any, kind: str
) -> None:
    start, units = EAGER_MAPS[kind]
    blocking = Blocking(shared)
    results = start(pool, blocking, range(6))
    blocking.wait_started(units)
    del results
    gc.collect()
    blocking.wait_ended(units)


class Recorder:
    """Records each item it is called with (``shared``: seen from a worker process)."""

    def __init__(self, shared: Any) -> None:
        self.items = shared.list()

    def __call__(self, n: int) -> None:
        self.items.append(n)


@pytest.mark.parametrize("kind", [kind for kind in EAGER_MAPS if not kind.startswith("unordered")])
def test_an_unstarted_map_iterator_leaves_its_work_to_run(
    pool: PortalPool[Any], shared: Any, submitted: list[Future[Any]], kind: str
) -> None:
    """``map`` keeps ``Executor.map``'s contract (CPython's test_map_submits_without_iteration,
    run against this pool in test_stdlib_executor): the work of an iterator that was never
    started runs; dropping it cancels only from its first ``next()`` on."""
    start, units = EAGER_MAPS[kind]
    recorder = Recorder(shared)
    results = start(pool, recorder, range(6))
    del results
    gc.collect()
    assert len(submitted) == units  # the first window, and nothing after it
    done, not_done = wait(submitted, timeout=10)
    assert not not_done
    assert not any(future.cancelled() for future in done)
    assert sorted(recorder.items) == list(range(_items_of(kind, units)))


def _wait_workers_ended(workers: Iterable[Any], host: str) -> None:
    """Every worker's loop has ended: its thread, or its link thread and its process."""
    for worker in workers:
        worker._exited.result(timeout=10)
        worker._host_loop.join()  # past its last step: no real wait
        assert not worker._host_loop.is_alive()
        if host == "process":
            with pytest.raises(ProcessLookupError):  # ended and reaped
                os.kill(worker.pid, 0)


def test_an_unstarted_iterator_does_not_keep_the_pool_alive(
    backend_kwargs: dict[str, Any], pool_host: str
) -> None:
    pool = PortalPool(1, **backend_kwargs)
    workers = pool.workers  # a worker holds no reference to its pool
    pool_ref = weakref.ref(pool)
    results = pool.map(square, range(3))
    del pool
    gc.collect()
    assert pool_ref() is None
    _wait_workers_ended(workers, pool_host)
    assert list(results) == [0, 1, 4]  # submitted before the pool went: they ran


@pytest.mark.parametrize("kind", EAGER_MAPS)
def test_an_input_error_in_the_first_window_cancels_what_was_submitted(
    pool: PortalPool[Any], shared: Any, kind: str
) -> None:
    start, _ = EAGER_MAPS[kind]
    blocking = Blocking(shared)

    def failing_input() -> Iterator[int]:
        yield from range(2)  # one chunk of two, or two items: within every first window
        blocking.wait_started(2)  # they run: only a cancel can end them
        raise LookupError("the input failed")

    with pytest.raises(LookupError, match="the input failed"):
        start(pool, blocking, failing_input())
    blocking.wait_ended(2)


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_an_input_error_in_an_async_maps_first_window_cancels_what_was_submitted(
    pool: PortalPool[Any], shared: Any, ordered: bool
) -> None:
    blocking = Blocking(shared)

    def failing_input() -> Iterator[int]:
        yield from range(2)
        blocking.wait_started(2)  # blocks the caller's loop a moment; the pool's run
        raise LookupError("the input failed")

    results = (pool.map_async if ordered else pool.map_unordered_async)(blocking, failing_input())
    with pytest.raises(LookupError, match="the input failed"):
        await results.__anext__()
    await anyio.to_thread.run_sync(blocking.wait_ended, 2)


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_async_maps_start_nothing_before_the_first_anext(
    pool: PortalPool[Any], ordered: bool
) -> None:
    # On the process and Ray hosts a call's exit is reported by its worker after the
    # call has ended: the last test's cancelled calls may not be counted yet.
    wait_until(lambda: pool.stats().pending == 0)
    before = pool.stats()
    source = CountingSource(10)
    results = (pool.map_async if ordered else pool.map_unordered_async)(square, source)
    del results
    gc.collect()
    assert source.consumed == 0
    after = pool.stats()
    assert after.pending == 0
    assert after.completed == before.completed


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
# trio warns about the dropped generator (the docs say to use aclosing), then closes it.
@pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
async def test_dropping_a_started_async_map_cancels_its_work(
    pool: PortalPool[Any], shared: Any, ordered: bool
) -> None:
    blocking = Blocking(shared)

    async def first_fast(n: int) -> int:
        return n if n == 0 else await blocking(n)

    results = (pool.map_async if ordered else pool.map_unordered_async)(
        first_fast, range(5), buffersize=4
    )
    assert await results.__anext__() == 0  # item 4 is submitted as the result is taken
    await anyio.to_thread.run_sync(blocking.wait_started, 4)
    del results
    gc.collect()  # the caller's loop closes the dropped generator (its asyncgen hooks)
    await anyio.to_thread.run_sync(blocking.wait_ended, 4)
    assert sorted(blocking.ended_items) == [1, 2, 3, 4]


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_breaking_out_of_an_async_map_cancels_its_work(
    pool: PortalPool[Any], shared: Any, ordered: bool
) -> None:
    blocking = Blocking(shared)

    async def first_fast(n: int) -> int:
        return n if n == 0 else await blocking(n)

    maps = pool.map_async if ordered else pool.map_unordered_async
    async with aclosing(maps(first_fast, range(6), buffersize=3)) as results:
        async for result in results:
            assert result == 0
            await anyio.to_thread.run_sync(blocking.wait_started, 3)
            break
    await anyio.to_thread.run_sync(blocking.wait_ended, 3)
    assert sorted(blocking.ended_items) == [1, 2, 3]


class InterruptAt:
    """A tracer: raise KeyboardInterrupt, as a Ctrl-C would, at the nth point of the given
    file that this thread reaches. Python runs a signal's handler at a function's entry,
    or after a call, between lines; the points are function entries and line starts.
    """

    def __init__(self, filename: str, nth: int) -> None:
        self._filename = filename
        self._left = nth
        self.fired = False
        self._disarmed = False

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != self._filename or self.fired or self._disarmed:
            return None
        if event == "exception":
            # Some other error (a timeout) is on its way out: a Ctrl-C now would be a
            # second fault, hitting the clean-up of the first.
            self._disarmed = True
            return None
        # A generator resumed is a "call" too, but an error raised by the tracer there
        # skips the generator's handlers, which a real Ctrl-C would not; its first line
        # stands for it.
        resumed = event == "call" and frame.f_code.co_flags & inspect.CO_GENERATOR
        if event in ("call", "line") and not resumed:
            if self._left:
                self._left -= 1
            else:
                self.fired = True
                raise KeyboardInterrupt
        return self


async def forever(n: int) -> int:
    await anyio.sleep(3600)
    return n


async def two_fast_then_forever(n: int) -> int:
    return n if n < 2 else await forever(n)


# Maps whose first next() ends on its own: a timeout, or the result of item 0 or 1.
FIRST_NEXT_ENDS: dict[str, Callable[[PortalPool[Any], Iterable[int]], Iterator[Any]]] = {
    "ordered": lambda pool, items: pool.map(forever, items, timeout=0.1),
    "chunked": lambda pool, items: pool.map(forever, items, chunksize=2, timeout=0.1),
    "buffered": lambda pool, items: pool.map(forever, items, buffersize=4, timeout=0.1),
    "chunked buffered": lambda pool, items: pool.map(
        forever, items, chunksize=2, buffersize=2, timeout=0.1
    ),
    "unordered": lambda pool, items: pool.map_unordered(two_fast_then_forever, items),
    "unordered buffered": lambda pool, items: pool.map_unordered(
        two_fast_then_forever, items, buffersize=4
    ),
}


@pytest.mark.parametrize("kind", FIRST_NEXT_ENDS)
def test_ctrl_c_at_any_point_of_next_leaves_no_task_running(
    pool: PortalPool[Any], submitted: list[Future[Any]], kind: str
) -> None:
    import portal_pool._iteration

    start = FIRST_NEXT_ENDS[kind]
    nth = 0
    while True:  # a Ctrl-C at the first point that next() reaches, then the second, ...
        results = start(pool, range(6))
        tracer = InterruptAt(portal_pool._iteration.__file__, nth)
        sys.settrace(tracer)
        try:
            next(results)
        except (KeyboardInterrupt, FutureTimeout):
            pass
        finally:
            sys.settrace(None)
        if not tracer.fired:
            break  # next() ended before its nth point
        # Every future is done: cancelled by the map, or (item 0 or 1) finished.
        _, not_done = wait(submitted, timeout=10)
        assert not not_done, f"a Ctrl-C at point {nth} of next() left a task running"
        del results
        submitted.clear()
        nth += 1
    assert nth > 2
    del results
