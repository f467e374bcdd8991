"""map: order, chunks, the bounded window, timeouts, early exit and memory."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
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
