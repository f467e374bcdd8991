"""PortalPool: a ``concurrent.futures.Executor`` over event-loop workers, in threads or
child processes."""

from __future__ import annotations

import sys
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Hashable,
    Mapping,
)
from concurrent.futures import Executor, Future
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, NoReturn, ParamSpec, TypeVar, overload

import anyio

from ._backends import check_backend
from ._chunks import run_chunk_asyncio, run_chunk_trio
from ._exceptions import BrokenPortalPool, safe_repr
from ._flow import FORK_MESSAGE, SHUTDOWN_MESSAGE, PendingLimit
from ._host import Host, LoopSettings
from ._hosts import make_host
from ._lifecycle import (
    check_not_exiting,
    close_workers,
    join_workers,
    register_workers,
    stop_workers,
    wait_done,
)
from ._mapping import MapMethods
from ._scheduler import Loads, RoundRobin, Scheduler, make_scheduler
from ._statistics import PoolStatistics
from ._thread_host import ThreadHost
from ._tokens import wait_for_result, wait_future
from ._watchdog import StallWatchdog
from ._worker import Worker, _task_worker

T = TypeVar("T")
P = ParamSpec("P")
C = TypeVar("C")

_MASK64 = (1 << 64) - 1


class PortalPool(MapMethods, Executor, Generic[C]):
    """A pool of workers, each running one event loop behind an anyio portal, in a thread
    (the default) or in a child process of its own (``host="process"``).

    Coroutine functions are awaited in the worker's loop; sync callables run in the loop
    thread and block that loop while they run, so keep them short or hand them to
    ``anyio.to_thread`` inside a coroutine.

    :param max_workers: number of workers; ``None`` means one per CPU
    :param backend: ``"asyncio"`` or ``"trio"``
    :param backend_options: passed to the backend, e.g. ``{"use_uvloop": True}``
    :param worker_context: zero-argument factory of an async context manager that each
        worker enters in its own loop before accepting work and exits after its last
        task; tasks read the value as ``current_worker().context``
    :param thread_name_prefix: prefix of the worker threads' names (on the process host,
        of the threads that link to each worker process)
    :param schedule: ``"round_robin"``, ``"least_loaded"`` or a :class:`Scheduler`
    :param max_concurrency: per-worker cap on running tasks; more work waits in the
        worker without starting
    :param max_pending: pool-wide cap on unfinished tasks; ``submit`` blocks and
        ``run_async`` waits (without blocking its loop) while the pool is full
    :param stall_timeout: seconds after which an unresponsive worker loop is reported
        on the ``portal_pool`` logger with its thread's stack; ``None`` disables it
    :param host: where the workers' loops live: ``"thread"`` (a :class:`ThreadHost`),
        ``"process"`` (a :class:`ProcessHost`), or a host object
    :raises ValueError: for a bad ``max_workers``, backend, option, policy, limit or host
    :raises ImportError: if the backend's package is not installed
    :raises BrokenPortalPool: if a worker's loop or ``worker_context`` fails to start;
        no thread is left running
    :raises RuntimeError: once the interpreter is exiting (in an ``atexit`` handler, or
        a thread still running then), where nothing would wait for the pool's work
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        backend: str = "asyncio",
        backend_options: Mapping[str, Any] | None = None,
        worker_context: Callable[[], AbstractAsyncContextManager[C]] | None = None,
        thread_name_prefix: str = "portal_pool",
        schedule: str | Scheduler = "round_robin",
        max_concurrency: int | None = None,
        max_pending: int | None = None,
        stall_timeout: float | None = None,
        host: str | Host = "thread",
    ) -> None:
        check_not_exiting()  # checked again as the workers register, under the lock
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        options = check_backend(backend, backend_options)
        if worker_context is not None and not callable(worker_context):
            raise TypeError(
                "worker_context must be a zero-argument callable returning an async "
                f"context manager, got {type(worker_context).__name__}"
            )
        for name, value in (("max_concurrency", max_concurrency), ("max_pending", max_pending)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {safe_repr(value)}")
        if stall_timeout is not None and not stall_timeout > 0:
            raise ValueError(
                f"stall_timeout must be None or > 0 seconds, got {safe_repr(stall_timeout)}"
            )
        self._host = make_host(host)
        if max_workers is None:
            max_workers = self._host._default_max_workers()
        self._backend = backend
        self._run_chunk = run_chunk_trio if backend == "trio" else run_chunk_asyncio
        self._scheduler = make_scheduler(schedule)
        self._round_robin = type(self._scheduler) is RoundRobin
        self._next_index = 0
        self._pending_limit = None if max_pending is None else PendingLimit(max_pending)
        self._shutdown = False
        settings = LoopSettings(
            backend=backend,
            backend_options=options,
            context_factory=worker_context,
            thread_name_prefix=thread_name_prefix,
            max_concurrency=max_concurrency,
            pending_limit=self._pending_limit,
            stall_timeout=stall_timeout,
        )
        self._workers: tuple[Worker[C], ...] = tuple(
            Worker(index, self._host, settings) for index in range(max_workers)
        )
        self._loads = Loads(self._workers)
        self._start_workers()
        self._watchdog = None
        # A worker process runs its own watchdog, which reports to this one's log.
        if stall_timeout is not None and isinstance(self._host, ThreadHost):
            self._watchdog = StallWatchdog(
                self._workers, stall_timeout, f"{thread_name_prefix}-watchdog"
            )
            self._watchdog.start()
        # Like ThreadPoolExecutor: a pool dropped without shutdown() still lets its
        # workers finish what they hold and exit. The callback must not hold the pool.
        self._finalizer = weakref.finalize(
            self, close_workers, self._workers, self._pending_limit, self._watchdog
        )
        self._finalizer.atexit = False

    def _start_workers(self) -> None:
        register_workers(self._workers)
        try:
            for worker in self._workers:
                worker._start()
            for worker in self._workers:
                wait_done(worker._ready)
                # A worker's failure, whatever its type, is the worker's: a CancelledError
                # or KeyboardInterrupt from its worker_context must not reach the caller
                # as if the caller had been cancelled or interrupted.
                failure = worker._ready.exception()
                if failure is not None:
                    raise BrokenPortalPool(
                        f"a worker failed to start: {safe_repr(failure)}"
                    ) from failure
        except BaseException as exc:
            # Ctrl-C during startup, or a worker that could not start: leave nothing.
            stop_workers(self._workers, True)
            join_workers(self._workers, isinstance(exc, KeyboardInterrupt))
            if isinstance(exc, Exception) and not isinstance(exc, BrokenPortalPool):
                # No thread could be started, say.
                raise BrokenPortalPool(f"a worker failed to start: {safe_repr(exc)}") from exc
            raise

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a PortalPool cannot be sent to a worker: its locks, threads and processes "
            "belong to this process; submit the work from here instead"
        )

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<PortalPool {self._backend} workers={len(self._workers)} {state}>"

    @property
    def workers(self) -> tuple[Worker[C], ...]:
        """The workers, in index order."""
        return self._workers

    @property
    def host(self) -> Host:
        """Where the workers' loops live: a :class:`ThreadHost` or a :class:`ProcessHost`."""
        return self._host

    @property
    def backend(self) -> str:
        """The backend the workers run: ``"asyncio"`` or ``"trio"``."""
        return self._backend

    def _next_worker(self) -> Worker[C]:
        if self._round_robin:
            # The default policy, inlined: three Python calls fewer on every submit.
            # As in RoundRobin, a race between submitters costs fairness, not safety.
            index = self._next_index % len(self._workers)
            self._next_index = index + 1
            return self._workers[index]
        index = self._scheduler.choose(self._loads)
        if not 0 <= index < len(self._workers):
            raise ValueError(
                f"the scheduler chose worker {safe_repr(index)}; it must return an index in "
                f"range({len(self._workers)})"
            )
        return self._workers[index]

    def worker_for(self, key: Hashable) -> Worker[C]:
        """The worker for ``key``: the same one for the pool's lifetime, keys spread evenly.

        Use it for work tied to loop-bound state, e.g. one connection per tenant:
        ``pool.worker_for(tenant).submit(handle, request)``.
        """
        # Fibonacci hashing, then the top bits of the 64-bit product pick the worker
        # (multiply-shift range reduction): the top bits depend on every bit of the
        # hash, so keys with patterned hashes (multiples of the worker count, values
        # differing only in high bits) still spread evenly; hash() % n would not.
        mixed = ((hash(key) & _MASK64) * 0x9E3779B97F4A7C15) & _MASK64
        return self._workers[(mixed * len(self._workers)) >> 64]

    def stats(self) -> PoolStatistics:
        """A snapshot of every worker's counters, and their totals. Never blocks a loop."""
        workers = tuple(worker._statistics() for worker in self._workers)
        return PoolStatistics(
            workers=workers,
            running=sum(w.running for w in workers),
            queued=sum(w.queued for w in workers),
            completed=sum(w.completed for w in workers),
            failed=sum(w.failed for w in workers),
            cancelled=sum(w.cancelled for w in workers),
            restarts=sum(w.restarts for w in workers),
            stalls=sum(w.stalls for w in workers),
            pending=sum(w.running + w.queued for w in workers),
        )

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
        self._check_open()
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
        self._check_open()
        return await self._next_worker().run_async(fn, *args, **kwargs)

    # -- shutting down ------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; by default wait for the work already submitted.

        Safe to call more than once and from several threads.

        A first Ctrl-C while it waits cancels what is left and waits for its clean-up; a
        second stops waiting. Called while a Ctrl-C is being handled (in the exit of a
        ``with`` block it left, or an ``except`` clause), the next one is the second.

        :param wait: wait until every task has finished and every thread has exited
        :param cancel_futures: cancel every unfinished task, queued or running: nothing
            queued starts after this call, and running tasks get a cancellation in
            their loops (a sync call, which cannot be interrupted, finishes). A call
            given to an idle worker counts as started, as with ``ThreadPoolExecutor``.
        :raises RuntimeError: if ``wait`` is true and this is called from one of the
            pool's own loops, where it would deadlock
        """
        if self._workers[0]._forked:
            raise BrokenPortalPool(FORK_MESSAGE)
        if wait:
            self._check_not_in_own_loop("shutdown(wait=True)")
            self._check_not_awaited_by_own_task("shutdown(wait=True)")
        self._begin_shutdown(cancel_futures)
        if wait:
            self._join(isinstance(sys.exc_info()[1], KeyboardInterrupt))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # A block left by an exception (Ctrl-C included) does not wait for the work.
        self.shutdown(wait=True, cancel_futures=exc_type is not None)

    async def __aenter__(self) -> PortalPool[C]:
        _protect_exit_from_trio_ctrl_c()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # On trio, KI-protected: a Ctrl-C arrives at one of the awaits below, never
        # between two steps of the shutdown (see _protect_exit_from_trio_ctrl_c).
        self._check_not_in_own_loop("leaving 'async with'")
        self._begin_shutdown(exc_type is not None)
        try:
            await self._workers_exited()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) and isinstance(exc_val, KeyboardInterrupt):
                raise  # the second Ctrl-C, the block having been left by the first
            # Cancelled, or a first Ctrl-C: cancel what is left, wait for its clean-up.
            # On trio a Ctrl-C still gets through the shield: that is the second one.
            stop_workers(self._workers, True)
            with anyio.CancelScope(shield=True):
                await self._workers_exited()
            raise
        finally:
            if all(worker._exited.done() for worker in self._workers):
                self._join()  # every thread is past its last step: no real wait

    async def _workers_exited(self) -> None:
        for worker in self._workers:
            await wait_future(worker._exited)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError(SHUTDOWN_MESSAGE)

    def _begin_shutdown(self, cancel: bool) -> None:
        # One store, no lock: a lock here would deadlock a signal handler's shutdown
        # landing while this thread held it.
        self._shutdown = True
        close_workers(self._workers, self._pending_limit, self._watchdog, cancel=cancel)

    def _join(self, interrupted: bool = False) -> None:
        join_workers(self._workers, interrupted)
        if self._watchdog is not None:
            self._watchdog.stop(wait=True)

    def _check_not_in_own_loop(self, what: str) -> None:
        for worker in self._workers:
            worker._check_not_own_loop(what)

    def _check_not_awaited_by_own_task(self, what: str) -> None:
        """Refuse to wait for the pool in a thread that one of its tasks is waiting on."""
        worker = _task_worker.get()
        if worker is not None and worker in self._workers:
            raise RuntimeError(
                f"{what} in a thread that a task of this pool is waiting on (through "
                f"anyio.to_thread, asyncio.to_thread or trio.to_thread) would deadlock: "
                f"the pool would wait for that task, and the task for this thread. Call "
                f"shutdown(wait=False) here, or shut the pool down from outside its tasks"
            )


# Whether trio knows that leaving ``async with`` must not be interrupted mid-step.
_exit_protected = False


def _protect_exit_from_trio_ctrl_c() -> None:
    """Have trio deliver a Ctrl-C that lands in ``PortalPool.__aexit__`` at an await.

    trio raises KeyboardInterrupt at whatever line runs, unless that code is KI-protected.
    Landing between two steps of the exit, it would leave the workers running, a stop
    half sent, or a lock held for good. Done on entering the block, not at import:
    portal_pool does not import trio, and a trio caller has loaded it by then.
    """
    global _exit_protected
    trio = sys.modules.get("trio")
    if trio is not None and not _exit_protected:
        # The function as defined here, even when a subclass overrides the method.
        trio.lowlevel.enable_ki_protection(vars(PortalPool)["__aexit__"])
        _exit_protected = True
