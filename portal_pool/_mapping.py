"""The pool's map methods: ``map``, ``map_unordered`` and their async forms."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._callables import check_callable
from ._iteration import (
    Window,
    batched,
    ordered_results,
    ordered_results_async,
    unordered_results,
    unordered_results_async,
)

if TYPE_CHECKING:
    from ._worker import Worker

T = TypeVar("T")


class MapMethods:
    """Mixed into :class:`~portal_pool.PortalPool`: every map goes through its submit."""

    # How a chunk of items runs in a worker's loop (the backend's run_chunk).
    _run_chunk: Callable[..., Any]

    if TYPE_CHECKING:

        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]: ...

        def _check_open(self) -> None: ...

        def _next_worker(self) -> Worker[Any]: ...

    @overload
    def map(
        self,
        fn: Callable[..., Awaitable[T]],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]: ...

    @overload
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]: ...

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map` of Python 3.14, on any Python.

        Results come in input order. With ``buffersize``, at most that many units of
        work (items, or chunks when ``chunksize > 1``) are in flight, and the input is
        read lazily. With ``chunksize > 1``, each chunk is one task and one future whose
        items run concurrently in one worker's loop. The first window is submitted by the
        call itself. Once iterating, leaving the iterator early (dropping it counts), a
        timeout, or an error from the input cancels the outstanding work. An iterator
        dropped before its first ``next()`` lets its work run, as ``Executor.map`` does.

        :raises TypeError: if ``fn`` is not callable or ``buffersize`` is not an int
        :raises ValueError: for ``chunksize < 1``, ``buffersize < 1`` or ``timeout < 0``
        :raises TimeoutError: from the iterator, when ``timeout`` has passed
        """
        check_callable(fn)
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be an integer >= 1")
        _check_buffersize(buffersize)
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or >= 0")
        end_time = None if timeout is None else time.monotonic() + timeout
        arguments = zip(*iterables)  # noqa: B905 - map stops at the shortest input
        if chunksize == 1:
            return ordered_results(
                Window(arguments, buffersize), self._item_submitter(fn), end_time, False
            )
        run_chunk = self._run_chunk
        pool_ref: weakref.ref[MapMethods] = weakref.ref(self)

        def submit_chunk(chunk: tuple[tuple[Any, ...], ...]) -> Future[Any]:
            return _alive(pool_ref).submit(run_chunk, fn, chunk)

        window = Window(batched(arguments, chunksize), buffersize)
        return ordered_results(window, submit_chunk, end_time, True)

    def map_unordered(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], buffersize: int | None = None
    ) -> Iterator[Any]:
        """Like :meth:`map`, but yield each result as soon as it is ready.

        Dropping the iterator cancels the outstanding work, even before its first ``next()``.

        :raises TypeError: if ``fn`` is not callable or ``buffersize`` is not an int
        :raises ValueError: for ``buffersize < 1``
        """
        return unordered_results(_item_window(fn, iterables, buffersize), self._item_submitter(fn))

    def map_async(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], buffersize: int | None = None
    ) -> AsyncIterator[Any]:
        """:meth:`map` for async callers on asyncio or trio: ``async for`` over results.

        Waiting never blocks the caller's loop. Leaving the loop early (``break``, an
        exception, cancellation) cancels the outstanding items; wrap the iterator in
        ``contextlib.aclosing`` so that happens at once rather than at garbage collection.

        :raises TypeError: if ``fn`` is not callable or ``buffersize`` is not an int
        :raises ValueError: for ``buffersize < 1``
        """
        window = _item_window(fn, iterables, buffersize)
        return ordered_results_async(window, self._item_submitter_async(fn))

    def map_unordered_async(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], buffersize: int | None = None
    ) -> AsyncIterator[Any]:
        """:meth:`map_unordered` for async callers on asyncio or trio; see :meth:`map_async`.

        :raises TypeError: if ``fn`` is not callable or ``buffersize`` is not an int
        :raises ValueError: for ``buffersize < 1``
        """
        window = _item_window(fn, iterables, buffersize)
        return unordered_results_async(window, self._item_submitter_async(fn))

    def _item_submitter(self, fn: Callable[..., Any]) -> Callable[[Any], Future[Any]]:
        # A weak reference, as in Executor.map: an abandoned iterator must not keep the
        # pool alive.
        pool_ref: weakref.ref[MapMethods] = weakref.ref(self)

        def submit_item(args: tuple[Any, ...]) -> Future[Any]:
            return _alive(pool_ref).submit(fn, *args)

        return submit_item

    def _item_submitter_async(
        self, fn: Callable[..., Any]
    ) -> Callable[[Any], Awaitable[Future[Any]]]:
        pool_ref: weakref.ref[MapMethods] = weakref.ref(self)

        async def submit_item(args: tuple[Any, ...]) -> Future[Any]:
            pool = _alive(pool_ref)
            pool._check_open()
            worker = pool._next_worker()
            await worker._admit_async()
            return worker._submit_admitted(fn, args, {})

        return submit_item


def _alive(pool_ref: weakref.ref[MapMethods]) -> MapMethods:
    pool = pool_ref()
    if pool is None:
        raise RuntimeError("cannot schedule new futures after the pool was garbage-collected")
    return pool


def _item_window(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], buffersize: int | None
) -> Window:
    """Check a map's arguments; its input as one unit of work per item."""
    check_callable(fn)
    _check_buffersize(buffersize)
    return Window(zip(*iterables), buffersize)  # noqa: B905 - stops at the shortest input


def _check_buffersize(buffersize: int | None) -> None:
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
