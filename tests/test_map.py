"""map: order, chunks, the bounded window, timeouts, early exit and memory."""

from __future__ import annotations

import gc
import inspect
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .helpers import CountingSource

MakePool = Callable[..., PortalPool[Any]]


async def square(n: int) -> int:
    await anyio.sleep(0)
    return n * n


@pytest.mark.parametrize("chunksize", [1, 3, 512])
def test_results_in_input_order(make_pool: MakePool, chunksize: int) -> None:
    pool = make_pool(3)
    assert list(pool.map(square, range(100), chunksize=chunksize)) == [n * n for n in range(100)]


def test_several_iterables_and_sync_functions(make_pool: MakePool) -> None:
    pool = make_pool(2)
    assert list(pool.map(pow, [2, 3, 4], [3, 2, 1], chunksize=2)) == [8, 9, 4]
    assert list(pool.map(lambda a, b: a + b, "abc", "xyz")) == ["ax", "by", "cz"]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_error_raised_at_its_position(make_pool: MakePool, chunksize: int) -> None:
    pool = make_pool(2)

    async def check(n: int) -> int:
        if n == 5:
            raise ValueError(n)
        return n

    results = pool.map(check, range(10), chunksize=chunksize)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="5"):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_buffersize_reads_input_lazily(make_pool: MakePool, chunksize: int) -> None:
    pool = make_pool(2)
    source = CountingSource(1000)

    results = pool.map(square, source, buffersize=3, chunksize=chunksize)
    assert source.consumed == 3 * chunksize  # the first window is submitted eagerly
    assert next(results) == 0
    assert source.consumed <= 4 * chunksize  # one more unit per result taken
    assert list(results) == [n * n for n in range(1, 1000)]


def test_leaving_early_cancels_outstanding_work(make_pool: MakePool) -> None:
    pool = make_pool(2)
    entered = threading.Semaphore(0)
    cancelled: list[int] = []

    async def slow(n: int) -> int:
        if n == 0:
            return 0
        try:
            entered.release()
            await anyio.sleep(3600)
        finally:
            cancelled.append(n)
        return n

    results = pool.map(slow, range(5), buffersize=4)
    assert next(results) == 0  # taking it submits item 4: items 1-4 are now in flight
    for _ in range(4):
        assert entered.acquire(timeout=10)
    results.close()  # what a `break` out of a for loop does, at the generator's collection
    pool.shutdown(wait=True)
    assert sorted(cancelled) == [1, 2, 3, 4]


def test_timeout_raises_and_cancels(make_pool: MakePool) -> None:
    pool = make_pool(1)
    cleaned = threading.Event()

    async def forever(n: int) -> None:
        try:
            await anyio.sleep(3600)
        finally:
            cleaned.set()

    results = pool.map(forever, range(3), timeout=0.05)
    with pytest.raises(FutureTimeout):
        next(results)
    assert cleaned.wait(10)


def test_iterator_keeps_no_reference_to_yielded_results(make_pool: MakePool) -> None:
    pool = make_pool(1)

    class Item:
        pass

    refs: dict[int, weakref.ref[Item]] = {}

    def make(n: int) -> Item:
        item = Item()
        refs[n] = weakref.ref(item)  # keyed: trio does not run tasks in spawn order
        return item

    for chunksize in (1, 4):
        refs.clear()
        results = pool.map(make, range(8), chunksize=chunksize)
        first = next(results)
        del first
        # The worker drops its last reference right after it resolves the future; a
        # round trip through the same (single) worker orders us after that.
        pool.run(lambda: None)
        gc.collect()
        assert refs[0]() is None
        list(results)


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
    make_pool: MakePool, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    pool = make_pool(1)
    with pytest.raises(error, match=message):
        pool.map(square, range(3), **kwargs)


class Blocking:
    """A task body that waits until cancelled; counts the tasks that started and ended."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.ended = threading.Semaphore(0)

    async def __call__(self, n: int) -> int:
        try:
            self.started.release()
            await anyio.sleep(3600)
        finally:
            self.ended.release()
        return n

    def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert self.started.acquire(timeout=10), "a task never started"

    def wait_ended(self, count: int) -> None:
        for _ in range(count):
            assert self.ended.acquire(timeout=10), "a task kept running: nothing cancelled it"


# The sync maps, which submit their first window when called (as Executor.map does):
# how to call each, and how many of its tasks then run.
EAGER_MAPS: dict[
    str, tuple[Callable[[PortalPool[Any], Callable[[int], Any], Iterable[int]], Iterator[Any]], int]
] = {
    "ordered": (lambda pool, fn, items: pool.map(fn, items), 6),
    "chunked": (lambda pool, fn, items: pool.map(fn, items, chunksize=2), 6),
    "buffered": (lambda pool, fn, items: pool.map(fn, items, buffersize=4), 4),
    "chunked buffered": (lambda pool, fn, items: pool.map(fn, items, chunksize=2, buffersize=2), 4),
    "unordered": (lambda pool, fn, items: pool.map_unordered(fn, items), 6),
    "unordered buffered": (lambda pool, fn, items: pool.map_unordered(fn, items, buffersize=4), 4),
}


@pytest.mark.parametrize("kind", [kind for kind in EAGER_MAPS if kind.startswith("unordered")])
def test_dropping_the_iterator_before_its_first_next_cancels_its_work(
    make_pool: MakePool, kind: str
) -> None:
    start, running = EAGER_MAPS[kind]
    pool = make_pool(2)
    blocking = Blocking()
    results = start(pool, blocking, range(6))
    blocking.wait_started(running)
    del results
    gc.collect()
    blocking.wait_ended(running)


@pytest.mark.parametrize("kind", [kind for kind in EAGER_MAPS if not kind.startswith("unordered")])
def test_an_unstarted_map_iterator_leaves_its_work_to_run(make_pool: MakePool, kind: str) -> None:
    """``map`` keeps ``Executor.map``'s contract (CPython's test_map_submits_without_iteration,
    run against this pool in test_stdlib_executor): the work of an iterator that was never
    started runs; dropping it cancels only from its first ``next()`` on."""
    start, submitted = EAGER_MAPS[kind]
    pool = make_pool(2)
    finished: list[int] = []
    results = start(pool, finished.append, range(6))
    del results
    gc.collect()
    pool.shutdown(wait=True)
    assert sorted(finished) == list(range(submitted))


def test_an_unstarted_iterator_does_not_keep_the_pool_alive(backend_kwargs: dict[str, Any]) -> None:
    pool = PortalPool(1, **backend_kwargs)
    threads = [w._host_loop._thread for w in pool.workers]
    pool_ref = weakref.ref(pool)
    results = pool.map(square, range(3))
    del pool
    gc.collect()
    assert pool_ref() is None
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert list(results) == [0, 1, 4]  # submitted before the pool went: they ran


@pytest.mark.parametrize("kind", EAGER_MAPS)
def test_an_input_error_in_the_first_window_cancels_what_was_submitted(
    make_pool: MakePool, kind: str
) -> None:
    start, _ = EAGER_MAPS[kind]
    pool = make_pool(2)
    blocking = Blocking()

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
    make_pool: MakePool, ordered: bool
) -> None:
    pool = make_pool(2)
    blocking = Blocking()

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
    make_pool: MakePool, ordered: bool
) -> None:
    pool = make_pool(1)
    source = CountingSource(10)
    results = (pool.map_async if ordered else pool.map_unordered_async)(square, source)
    del results
    gc.collect()
    assert source.consumed == 0
    assert pool.stats().completed == pool.stats().pending == 0


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
# trio warns about the dropped generator (the docs say to use aclosing), then closes it.
@pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")
async def test_dropping_a_started_async_map_cancels_its_work(
    make_pool: MakePool, ordered: bool
) -> None:
    pool = make_pool(2)
    blocking = Blocking()

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
def test_ctrl_c_at_any_point_of_next_leaves_no_task_running(make_pool: MakePool, kind: str) -> None:
    import portal_pool._iteration

    start = FIRST_NEXT_ENDS[kind]
    pool = make_pool(2)
    submitted: list[Future[Any]] = []
    submit = pool.submit

    def recording_submit(fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future = submit(fn, *args)
        submitted.append(future)
        return future

    pool.submit = recording_submit  # type: ignore[method-assign,assignment]  # the maps call it
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
