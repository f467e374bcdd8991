"""The result iterators behind map, map_unordered, map_async and map_unordered_async.

Each keeps a window of futures in flight, refills it as results are taken, cancels
what is still outstanding when left early, and never holds on to a result it has
yielded: values are yielded straight from a call, since a suspended generator keeps its
locals alive after the caller has dropped the value.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from concurrent.futures import Future
from itertools import islice
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import current_token

from ._future import Outcome
from ._signals import SIGNAL_CHECK_INTERVAL
from ._tokens import call_soon_or_drop, wait_future

T = TypeVar("T")

SubmitUnit = Callable[[Any], Future[Any]]
SubmitUnitAsync = Callable[[Any], Awaitable[Future[Any]]]


class Window:
    """The input side of a map: units of work (items or chunks) and how many may be out."""

    def __init__(self, units: Iterator[Any], size: int | None) -> None:
        self._units = units
        self._size = size

    def first(self) -> Iterator[Any]:
        """The units to submit before the first result: all, or the first ``size``."""
        return self._units if self._size is None else islice(self._units, self._size)

    def next_unit(self) -> Any | None:
        """One more unit after a result was taken, if the window is bounded."""
        if self._size is None:
            return None
        return next(self._units, None)


def ordered_results(
    window: Window, submit: SubmitUnit, end_time: float | None, chunked: bool
) -> Iterator[Any]:
    """Results in input order (``Executor.map``); the first window is submitted now."""
    return _primed(_ordered(window, submit, end_time, chunked))


def unordered_results(window: Window, submit: SubmitUnit) -> Iterator[Any]:
    """Results in completion order; the first window is submitted now."""
    return _primed(_unordered(window, submit))


def _primed(results: Generator[Any, None, None]) -> Generator[Any, None, None]:
    """Run ``results`` to its first ``yield``: up to there, it submits the first window.

    A generator that was never started runs no ``finally`` when it is closed or dropped.
    Started here, it waits inside its ``try``, so an iterator dropped before its first
    ``next()`` can still cancel what it submitted (``map_unordered`` does; ``map`` keeps
    ``Executor.map``'s contract and lets it run). An error while the first window is
    submitted (the input's own included) propagates from here, after that ``finally``
    has cancelled what was already submitted.
    """
    next(results)
    return results


def _ordered(
    window: Window, submit: SubmitUnit, end_time: float | None, chunked: bool
) -> Generator[Any, None, None]:
    futures: deque[Future[Any]] = deque()
    try:
        for unit in window.first():
            futures.append(submit(unit))
        try:
            yield None  # primed: see _primed
        except GeneratorExit:
            # Dropped before its first next(): as with Executor.map, whose work is
            # "fire and forget" then (CPython's test_map_submits_without_iteration),
            # what was submitted runs on. map_unordered has no such contract.
            futures.clear()
            raise
        while futures:
            unit = window.next_unit()
            if unit is not None:
                futures.append(submit(unit))
            if not chunked:
                yield _take_oldest(futures, end_time)
                continue
            outcomes: list[Outcome] = _take_oldest(futures, end_time)
            outcomes.reverse()
            while outcomes:
                yield unwrap(outcomes.pop())
    finally:
        for future in futures:
            future.cancel()


def _unordered(window: Window, submit: SubmitUnit) -> Generator[Any, None, None]:
    # A SimpleQueue: done callbacks run in worker threads and only put into it.
    finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    outstanding: set[Future[Any]] = set()

    def track(unit: Any) -> None:
        # One statement: no line between the submit and the record, where a Ctrl-C could
        # land and leave a task that nothing cancels.
        outstanding.add(future := submit(unit))
        future.add_done_callback(finished.put)

    try:
        for unit in window.first():
            track(unit)
        yield None  # primed: see _primed
        while outstanding:
            taken = [_next_finished(finished)]  # a list: no future is a local at the yield
            outstanding.discard(taken[0])
            unit = window.next_unit()
            if unit is not None:
                track(unit)
            yield result_of(taken.pop())
    finally:
        for future in outstanding:
            future.cancel()


async def ordered_results_async(window: Window, submit: SubmitUnitAsync) -> AsyncIterator[Any]:
    """Results in input order, awaited from asyncio or trio."""
    futures: deque[Future[Any]] = deque()
    try:
        for unit in window.first():
            futures.append(await submit(unit))
        while futures:
            unit = window.next_unit()
            if unit is not None:
                futures.append(await submit(unit))
            await wait_future(futures[0])
            yield result_of(futures.popleft())
    finally:
        for future in futures:
            future.cancel()


async def unordered_results_async(window: Window, submit: SubmitUnitAsync) -> AsyncIterator[Any]:
    """Results in completion order, awaited from asyncio or trio."""
    token = current_token()
    finished: deque[Future[Any]] = deque()
    outstanding: set[Future[Any]] = set()
    arrived = anyio.Event()

    def collect(future: Future[Any]) -> None:  # in the caller's loop
        finished.append(future)
        arrived.set()

    async def track(unit: Any) -> None:
        future = await submit(unit)
        outstanding.add(future)
        future.add_done_callback(lambda done: call_soon_or_drop(token, collect, done))

    try:
        for unit in window.first():
            await track(unit)
        while outstanding:
            while not finished:
                await arrived.wait()
                arrived = anyio.Event()
            outstanding.discard(finished[0])
            unit = window.next_unit()
            if unit is not None:
                await track(unit)
            yield result_of(finished.popleft())
    finally:
        for future in outstanding:
            future.cancel()


def _next_finished(finished: queue.SimpleQueue[Future[Any]]) -> Future[Any]:
    """The next finished future, waiting in slices so Ctrl-C gets through (see _signals)."""
    while True:
        try:
            return finished.get(timeout=SIGNAL_CHECK_INTERVAL)
        except queue.Empty:
            continue


def _take_oldest(futures: deque[Future[Any]], end_time: float | None) -> Any:
    """The oldest future's result; only then is the future dropped from ``futures``.

    Popped first, it would be in no one's hands while it is waited for: an error there
    (a timeout, or a Ctrl-C at any line) must leave it for the map's ``finally`` to cancel.
    """
    if end_time is None:
        value = futures[0].result()
    else:
        value = futures[0].result(end_time - time.monotonic())
    futures.popleft()
    return value


def result_of(future: Future[Any]) -> Any:
    """A finished future's result, or its error raised."""
    try:
        return future.result()
    finally:
        del future  # the traceback of a raised error would keep it otherwise


def unwrap(outcome: Outcome) -> Any:
    ok, value = outcome
    if ok:
        return value
    raise value


def batched(iterator: Iterator[T], size: int) -> Iterator[tuple[T, ...]]:
    while chunk := tuple(islice(iterator, size)):
        yield chunk
