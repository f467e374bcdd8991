"""PortalPool: a ``concurrent.futures.Executor`` over event-loop worker threads."""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import AbstractAsyncContextManager, suppress
from itertools import islice
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, overload

import anyio
from anyio.lowlevel import current_token

from ._backends import check_backend
from ._exceptions import BrokenPortalPool
from ._runtime import Outcome, run_chunk_asyncio, run_chunk_trio
from ._scheduler import RoundRobin
from ._worker import Worker, _call_soon_or_drop, check_callable, wait_for_result

T = TypeVar("T")
P = ParamSpec("P")
C = TypeVar("C")

# Workers of every pool not yet joined, for the interpreter-exit hook below.
_live_workers: weakref.WeakSet[Worker[Any]] = weakref.WeakSet()


class PortalPool(Executor, Generic[C]):
    """A pool of worker threads, each running one event loop behind an anyio portal.

    Work is spread over the workers round robin. Coroutine functions are awaited in the
    worker's loop; sync callables run in the loop thread and block that loop while they
    run, so keep them short or hand them to ``anyio.to_thread`` inside a coroutine.

    :param max_workers: number of worker threads; ``None`` means one per CPU
    :param backend: ``"asyncio"`` or ``"trio"``
    :param backend_options: passed to the backend, e.g. ``{"use_uvloop": True}``
    :param worker_context: zero-argument factory of an async context manager that each
        worker enters in its own loop before accepting work and exits after its last
        task; tasks read the value as ``current_worker().context``
    :param thread_name_prefix: prefix of the worker thread names
    :raises ValueError: for a bad ``max_workers``, backend or backend option
    :raises ImportError: if the backend's package is not installed
    :raises BrokenPortalPool: if a worker's loop or ``worker_context`` fails to start;
        no thread is left running
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        backend: str = "asyncio",
        backend_options: Mapping[str, Any] | None = None,
        worker_context: Callable[[], AbstractAsyncContextManager[C]] | None = None,
        thread_name_prefix: str = "portal_pool",
    ) -> None:
        if max_workers is None:
            max_workers = _cpu_count()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        options = check_backend(backend, backend_options)
        if worker_context is not None and not callable(worker_context):
            raise TypeError(
                "worker_context must be a zero-argument callable returning an async "
                f"context manager, got {type(worker_context).__name__}"
            )
        self._backend = backend
        self._run_chunk = run_chunk_trio if backend == "trio" else run_chunk_asyncio
        self._scheduler = RoundRobin()
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._workers: tuple[Worker[C], ...] = tuple(
            Worker(
                index,
                backend=backend,
                backend_options=options,
                context_factory=worker_context,
                thread_name=f"{thread_name_prefix}-{index}",
            )
            for index in range(max_workers)
        )
        self._start_workers()
        # Like ThreadPoolExecutor: a pool dropped without shutdown() still lets its
        # workers finish what they hold and exit. The callback must not hold the pool.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers, False)
        self._finalizer.atexit = False

    def _start_workers(self) -> None:
        try:
            for worker in self._workers:
                _live_workers.add(worker)
                worker._start()
            for worker in self._workers:
                worker._ready.result()
        except BaseException as exc:
            # Ctrl-C during startup, or a worker that could not start: leave nothing.
            _stop_workers(self._workers, True)
            _join_workers(self._workers)
            if isinstance(exc, Exception):
                raise BrokenPortalPool(f"a worker failed to start: {exc!r}") from exc
            raise

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<PortalPool {self._backend} workers={len(self._workers)} {state}>"

    @property
    def workers(self) -> tuple[Worker[C], ...]:
        """The workers, in index order."""
        return self._workers

    @property
    def backend(self) -> str:
        """The backend the workers run: ``"asyncio"`` or ``"trio"``."""
        return self._backend

    def _next_worker(self) -> Worker[C]:
        return self._workers[self._scheduler.choose(len(self._workers))]

    # -- submitting ------------------------------------------------------------------

    @overload
    def submit(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]: ...

    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...

    def submit(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` on a worker and return its future.

        Never blocks on a worker's loop, so it is safe from any thread, including one
        running its own asyncio or trio loop. ``future.cancel()`` also cancels a task
        that is already running.

        :raises TypeError: if ``fn`` is not callable, or is a coroutine object
        :raises RuntimeError: after shutdown
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._next_worker().submit(fn, *args, **kwargs)

    @overload
    def run(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    @overload
    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    def run(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run ``fn`` in a worker and block until it returns; re-raise its exception.

        If the wait is interrupted (e.g. by Ctrl-C), the task is cancelled.

        :raises RuntimeError: if called from one of this pool's own loops, where it would
            deadlock, or after shutdown
        """
        self._check_not_in_own_loop("run()")
        return wait_for_result(self.submit(fn, *args, **kwargs))

    @overload
    async def run_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def run_async(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def run_async(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Await ``fn`` run in a worker, from async code on asyncio or trio.

        The caller's loop is never blocked. Cancelling the caller cancels the task in
        the worker and waits for it to finish; the task's exception is raised here.

        :raises RuntimeError: after shutdown
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return await self._next_worker().run_async(fn, *args, **kwargs)

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
        items run concurrently in one worker's loop. Leaving the iterator early, or a
        timeout, cancels the outstanding work.

        :raises TypeError: if ``fn`` is not callable or ``buffersize`` is not an int
        :raises ValueError: for ``chunksize < 1``, ``buffersize < 1`` or ``timeout < 0``
        :raises TimeoutError: from the iterator, when ``timeout`` has passed
        """
        check_callable(fn)
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be an integer >= 1")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or >= 0")
        end_time = None if timeout is None else time.monotonic() + timeout
        arguments: Iterator[tuple[Any, ...]] = zip(*iterables)  # noqa: B905 - map stops at the shortest
        if chunksize == 1:
            units: Iterator[Any] = arguments
            submit_unit = _item_submitter(self, fn)
        else:
            units = _batched(arguments, chunksize)
            submit_unit = _chunk_submitter(self, fn)
        if buffersize is None:
            futures = deque(submit_unit(unit) for unit in units)
        else:
            futures = deque(submit_unit(unit) for unit in islice(units, buffersize))
        pool_ref: weakref.ref[PortalPool[Any]] = weakref.ref(self)
        refill = None if buffersize is None else (units, pool_ref)
        return _ordered_results(futures, submit_unit, refill, end_time, chunksize > 1)

    # -- shutting down ------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; by default wait for the work already submitted.

        Safe to call more than once and from several threads.

        :param wait: wait until every task has finished and every thread has exited
        :param cancel_futures: cancel every unfinished task, queued or running
        :raises RuntimeError: if ``wait`` is true and this is called from one of the
            pool's own loops, where it would deadlock
        """
        if wait:
            self._check_not_in_own_loop("shutdown(wait=True)")
        with self._shutdown_lock:
            self._shutdown = True
        _stop_workers(self._workers, cancel_futures)
        if wait:
            _join_workers(self._workers)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # A block left by an exception (Ctrl-C included) does not wait for the work.
        self.shutdown(wait=True, cancel_futures=exc_type is not None)

    async def __aenter__(self) -> PortalPool[C]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._check_not_in_own_loop("leaving 'async with'")
        with self._shutdown_lock:
            self._shutdown = True
        _stop_workers(self._workers, exc_type is not None)
        try:
            for worker in self._workers:
                await _wait_done(worker._exited)
        except BaseException:
            _stop_workers(self._workers, True)
            with anyio.CancelScope(shield=True):
                for worker in self._workers:
                    await _wait_done(worker._exited)
            raise
        finally:
            _join_workers(self._workers)

    def _check_not_in_own_loop(self, what: str) -> None:
        for worker in self._workers:
            worker._check_not_own_loop(what)


def _cpu_count() -> int:
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return count or 1


def _item_submitter(pool: PortalPool[Any], fn: Callable[..., Any]) -> Callable[[Any], Future[Any]]:
    def submit_item(args: tuple[Any, ...]) -> Future[Any]:
        return pool.submit(fn, *args)

    return submit_item


def _chunk_submitter(pool: PortalPool[Any], fn: Callable[..., Any]) -> Callable[[Any], Future[Any]]:
    run_chunk = pool._run_chunk

    def submit_chunk(chunk: tuple[tuple[Any, ...], ...]) -> Future[Any]:
        return pool.submit(run_chunk, fn, chunk)

    return submit_chunk


def _ordered_results(
    futures: deque[Future[Any]],
    submit_unit: Callable[[Any], Future[Any]],
    refill: tuple[Iterator[Any], weakref.ref[PortalPool[Any]]] | None,
    end_time: float | None,
    chunked: bool,
) -> Iterator[Any]:
    """Yield results in order.

    Values are yielded straight from a call, never bound to a local: a suspended
    generator keeps its locals alive, and the caller may have dropped the value already.
    """
    try:
        while futures:
            if refill is not None and refill[1]() is not None:
                unit = next(refill[0], None)
                if unit is not None:
                    futures.append(submit_unit(unit))
            if not chunked:
                yield _result_or_cancel(futures.popleft(), end_time)
                continue
            outcomes: list[Outcome] = _result_or_cancel(futures.popleft(), end_time)
            outcomes.reverse()
            while outcomes:
                yield _unwrap(outcomes.pop())
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(future: Future[Any], end_time: float | None) -> Any:
    try:
        if end_time is None:
            return future.result()
        return future.result(end_time - time.monotonic())
    except BaseException:
        future.cancel()
        raise
    finally:
        del future  # the traceback of a raised error would keep it otherwise


def _unwrap(outcome: Outcome) -> Any:
    ok, value = outcome
    if ok:
        return value
    raise value


def _batched(iterator: Iterator[T], size: int) -> Iterator[tuple[T, ...]]:
    while chunk := tuple(islice(iterator, size)):
        yield chunk


def _stop_workers(workers: Iterable[Worker[Any]], cancel: bool) -> None:
    for worker in workers:
        worker._request_stop(cancel)


def _join_workers(workers: Iterable[Worker[Any]]) -> None:
    """Join every worker thread; an interrupt while waiting cancels what is left."""
    interrupted: BaseException | None = None
    pending = [worker for worker in workers if worker._thread.ident is not None]
    while pending:
        try:
            pending[0]._thread.join()
        except BaseException as exc:
            if interrupted is not None:
                raise  # a second Ctrl-C: the user insists, stop waiting
            # The first Ctrl-C: cancel what is left, then wait for its cleanup.
            interrupted = exc
            _stop_workers(pending, True)
            continue
        _live_workers.discard(pending.pop(0))
    if interrupted is not None:
        raise interrupted


async def _wait_done(future: Future[Any]) -> None:
    """Await a ``concurrent.futures.Future`` from asyncio or trio without blocking."""
    if future.done():
        return
    token = current_token()
    done = anyio.Event()
    future.add_done_callback(lambda _: _call_soon_or_drop(token, done.set))
    await done.wait()


def _at_interpreter_exit() -> None:
    # Runs before the interpreter joins non-daemon threads. A script that ends normally
    # lets submitted work finish, as ThreadPoolExecutor does; one that is ending because
    # of an uncaught Ctrl-C cancels it instead of hanging on it.
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    workers = list(_live_workers)
    _stop_workers(workers, isinstance(last, KeyboardInterrupt))
    with suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting, let Python exit
        _join_workers(workers)


# The same hook ThreadPoolExecutor uses: atexit.register would run only after the
# interpreter has waited for our (non-daemon) threads, that is, never.
threading._register_atexit(_at_interpreter_exit)  # type: ignore[attr-defined]
