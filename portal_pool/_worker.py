"""One worker: a thread that runs one event loop behind an anyio ``BlockingPortal``."""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from contextvars import ContextVar
from functools import partial
from inspect import (
    CO_ASYNC_GENERATOR,
    CORO_CREATED,
    getcoroutinestate,
    isasyncgen,
    isasyncgenfunction,
    iscoroutine,
)
from types import FunctionType
from typing import Any, Generic, ParamSpec, TypeVar, overload

import anyio
from anyio.from_thread import BlockingPortal
from anyio.lowlevel import EventLoopToken, current_token

from ._exceptions import BrokenPortalPool, safe_repr
from ._flow import FORK_MESSAGE, SHUTDOWN_MESSAGE, PendingLimit
from ._future import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING, TaskFuture
from ._runtime import Runtime, make_runtime
from ._statistics import WorkerStatistics
from ._tokens import call_soon_or_drop

T = TypeVar("T")
P = ParamSpec("P")
C_co = TypeVar("C_co", covariant=True)

logger = logging.getLogger("portal_pool")

_thread_state = threading.local()

# The worker whose task runs the current code, in every task's context: unlike the
# thread-local above, it follows a task's call into anyio.to_thread, asyncio.to_thread
# and trio.to_thread, which copy the context, so a blocking call made there that would
# wait for that same task can be refused instead of deadlocking.
_task_worker: ContextVar[Worker[Any] | None] = ContextVar("portal_pool_task_worker", default=None)

# A worker whose loop fails again after this many restarts within this many seconds is
# broken rather than restarted: its failure comes back as soon as it starts.
RESTART_BURST = 5
RESTART_WINDOW = 1.0


def current_worker() -> Worker[Any]:
    """Return the worker whose event loop runs the calling code.

    :raises RuntimeError: if called outside a portal_pool worker's loop thread
    """
    worker: Worker[Any] | None = getattr(_thread_state, "worker", None)
    if worker is None:
        raise RuntimeError(
            "current_worker() was called outside a portal_pool worker; call it from "
            "code submitted to a PortalPool"
        )
    return worker


def check_callable(fn: object) -> None:
    """Reject what can't be submitted, before anything is queued.

    :raises TypeError: for anything but a callable, and for an async generator function,
        whose call returns a generator without running any of its body
    """
    if callable(fn):
        # A task awaits what the call returns if that is awaitable; an async generator
        # is not, so its body would never run. isasyncgenfunction also sees through
        # bound methods and functools.partial; a plain function, the common case on
        # every submit, is read directly at a third of the cost.
        if (
            fn.__code__.co_flags & CO_ASYNC_GENERATOR
            if isinstance(fn, FunctionType)
            else isasyncgenfunction(fn)
        ):
            raise TypeError(
                f"{_name_of(fn)} is an async generator function: a task would create the "
                f"generator and never run it; {_ITERATE_IT.format(_name_of(fn))}"
            )
        return
    if iscoroutine(fn):
        name = getattr(fn, "__name__", "fn")
        # No "coroutine was never awaited" warning for the caller's mistake. Only one that
        # never ran warns; closing one that did would throw into whoever is running it.
        if getcoroutinestate(fn) == CORO_CREATED:
            fn.close()
        raise TypeError(
            f"expected a callable but got a coroutine object; pass the function and "
            f"its arguments instead, e.g. submit({name}, arg) rather than "
            f"submit({name}(arg))"
        )
    if isasyncgen(fn):
        raise TypeError(
            f"expected a callable but got an async generator object; "
            f"{_ITERATE_IT.format(getattr(fn, '__name__', 'agen'))}"
        )
    raise TypeError(f"expected a callable, got {type(fn).__name__} {safe_repr(fn)}")


_ITERATE_IT = (
    "submit a coroutine function that iterates it instead, e.g. "
    "'async def collect(): return [x async for x in {0}(...)]'"
)


def _name_of(fn: object) -> str:
    while isinstance(fn, partial):
        fn = fn.func
    return str(getattr(fn, "__name__", "fn"))


class Worker(Generic[C_co]):
    """One thread, one event loop, one :class:`~anyio.from_thread.BlockingPortal`.

    The worker's main task runs inside the portal's task group. Work reaches it through
    an inbox: :meth:`submit` appends to a deque and wakes the loop (its runtime's
    ``wake``), once per burst rather than once per item, and never waits for the loop.
    That is why ``submit`` is safe from any thread, including one that runs its own
    asyncio or trio loop, where anyio's blocking portal calls would hang (trio) or block.
    """

    def __init__(
        self,
        index: int,
        *,
        backend: str,
        backend_options: dict[str, Any],
        context_factory: Callable[[], AbstractAsyncContextManager[C_co]] | None,
        thread_name: str,
        max_concurrency: int | None = None,
        pending_limit: PendingLimit | None = None,
    ) -> None:
        self._index = index
        self._backend = backend
        self._backend_options = backend_options
        self._context_factory = context_factory
        self._context: Any = None
        self._portal: BlockingPortal | None = None
        self._token: EventLoopToken | None = None
        self._runtime: Runtime | None = None
        self._thread_ident: int | None = None
        # Guards the inbox and the flags below; held only for a few bytecodes. Reentrant
        # only so that a submit or a stop re-entering a section in the thread that holds
        # it (a signal handler, __del__ or weakref callback, which Python may run
        # between any two bytecodes) can tell, with the lock's owner check, instead of
        # waiting for itself: see _enqueue_reentered and _request_stop.
        self._lock = threading.RLock()
        # A deque, swapped out whole by the loop: producers never wait for the loop,
        # and the loop takes a whole burst with one lock acquisition.
        self._inbox: deque[TaskFuture[Any]] = deque()
        # Work submitted by such re-entering calls: only the loop's drain takes it, and
        # counts it as submitted (see _take_reentered).
        self._reentered: deque[TaskFuture[Any]] = deque()
        self._wake_pending = False
        self._closed = False
        self._forked = False  # a copy of the worker in a child made by os.fork()
        self._stop_request: bool | None = None  # None, or the cancel flag of the stop
        self._ready: Future[None] = Future()
        self._exited: Future[None] = Future()
        self._thread = threading.Thread(target=self._thread_main, name=thread_name)
        self._spawner: threading.Thread | None = None
        self._startup_scope: anyio.CancelScope | None = None
        self._failure: BaseException | None = None
        # Flow control, in the loop thread only: tasks started and not yet ended, and
        # work held back by max_concurrency (never started, so cancelling it is free).
        self._max_concurrency = max_concurrency
        self._active = 0
        self._waiting: deque[TaskFuture[Any]] = deque()
        self._starting_waiting = False
        # Statistics. Submissions are counted under self._lock, exits under their own
        # lock: the loop thread settles every task, and sharing the inbox lock with the
        # submitters would make the two sides contend once per item.
        self._pending_limit = pending_limit
        self._submitted = 0
        # Reentrant for the same reason as self._lock: a task exit re-entering a section
        # is handed over to the interrupted thread (see _record_exit).
        self._exit_lock = threading.RLock()
        self._exits_handed_over: deque[TaskFuture[Any]] = deque()
        self._exited_count = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._restarts = 0
        self._stalls = 0
        self._loop_lag: float | None = None
        # The stall watchdog's ping in flight (its send time), and whether it was reported.
        self._ping_sent: float | None = None
        self._stall_reported = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Worker {self._index} {self._backend} {state}>"

    # -- public ------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The worker's position in ``pool.workers``."""
        return self._index

    @property
    def portal(self) -> BlockingPortal:
        """The anyio portal of this worker's loop, for power users.

        Its blocking methods must not be called from a thread running a trio loop, and
        they wait for the loop to respond; :meth:`submit` has neither limit.
        """
        if self._portal is None:
            raise RuntimeError(f"worker {self._index} has no running portal")
        return self._portal

    @property
    def context(self) -> C_co:
        """The value yielded by the pool's ``worker_context`` in this worker, or ``None``."""
        return self._context  # type: ignore[no-any-return]

    @overload
    def submit(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]: ...

    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...

    def submit(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in this worker's loop; await it if it is awaitable.

        Sync callables run in the loop thread and block the loop while they run.

        :raises TypeError: if ``fn`` is not callable, or is a coroutine object
        :raises RuntimeError: if the pool has been shut down
        """
        check_callable(fn)
        limit = self._pending_limit
        if limit is None:  # the hot path, kept flat
            future: TaskFuture[Any] = TaskFuture(self, fn, args, kwargs)
            self._enqueue(future)
            return future
        if limit.would_block():
            _check_not_in_pool_loop(limit)
        limit.acquire()
        return self._submit_admitted(fn, args, kwargs)

    def _submit_admitted(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_task_exit: Callable[[], object] | None = None,
    ) -> TaskFuture[Any]:
        """Queue work that already holds its ``max_pending`` room (given back on failure)."""
        future: TaskFuture[Any] = TaskFuture(self, fn, args, kwargs)
        future._on_task_exit = on_task_exit
        try:
            self._enqueue(future)
        except BaseException:
            if self._pending_limit is not None:
                self._pending_limit.release()
            raise
        return future

    async def _admit_async(self) -> None:
        if self._pending_limit is not None:
            await self._pending_limit.acquire_async()

    @overload
    def run(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    @overload
    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    def run(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Submit ``fn`` to this worker and block until it returns; re-raise its error.

        If the wait is interrupted (e.g. by Ctrl-C) the task is cancelled.

        :raises RuntimeError: if called from this worker's own loop, where it would deadlock
        """
        self._check_not_own_loop("run()")
        return wait_for_result(self.submit(fn, *args, **kwargs))

    @overload
    async def run_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def run_async(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def run_async(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Await ``fn`` run in this worker, from async code on any backend.

        Cancelling the caller cancels the task in the worker and waits until it has
        finished; the caller then sees its own cancellation.

        :raises RuntimeError: if the pool has been shut down
        """
        check_callable(fn)
        try:
            caller = current_token()
        except anyio.NoEventLoopError:
            raise RuntimeError(
                "run_async() must be awaited from code running in an asyncio or trio "
                "event loop; from sync code, call run() or submit() instead"
            ) from None
        exited = anyio.Event()

        def wake_caller() -> None:
            call_soon_or_drop(caller, exited.set)

        await self._admit_async()
        future = self._submit_admitted(fn, args, kwargs, on_task_exit=wake_caller)
        try:
            await exited.wait()
        except BaseException:
            future.cancel()
            with anyio.CancelScope(shield=True):
                await exited.wait()
            raise
        return future.result()

    # -- pool-facing -------------------------------------------------------------

    def _start(self) -> None:
        self._thread.start()

    def _enqueue(self, future: TaskFuture[Any]) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._enqueue_reentered(future)
            return
        with self._lock:
            if self._closed:
                raise self._refusal()
            # None until the loop accepts work; _accept_work drains what came before.
            runtime = self._runtime
            if runtime is not None and self._submitted == self._exited_count:
                # Idle and serving: the worker takes this call now, as an idle
                # ThreadPoolExecutor thread takes the item put for it. A stop that
                # cancels what is queued counts it as started, though the worker's
                # thread may not have run since: it can wait milliseconds for the GIL.
                future._taken = True
            self._inbox.append(future)
            self._submitted += 1
            if self._wake_pending:
                return
            self._wake_pending = True
            # Woken under the lock, so the runtime cannot be closed meanwhile.
            if runtime is not None:
                runtime.wake()

    def _enqueue_reentered(self, future: TaskFuture[Any]) -> None:
        """Queue work from a call that interrupted this thread inside a section of ours.

        Waiting for the lock would wait for that section, which cannot end before this
        call returns; and updating the inbox, the counter or the wake-up flag in the
        middle of it could be undone by its next line. The work goes to a deque that
        only the loop reads (with the lock, so never while this thread holds it), and
        the loop is woken for it whatever the flag says.
        """
        if self._closed:
            raise self._refusal()
        self._reentered.append(future)
        # No other thread is in a section meanwhile, so the runtime cannot be closed.
        runtime = self._runtime
        if runtime is not None:
            runtime.wake()

    def _refusal(self) -> Exception:
        """Why a closed worker refuses work."""
        if self._forked:
            return BrokenPortalPool(FORK_MESSAGE)
        if self._stop_request is None:
            return BrokenPortalPool(f"worker {self._index}'s event loop has stopped")
        return RuntimeError(SHUTDOWN_MESSAGE)

    def _take_reentered(self) -> list[TaskFuture[Any]]:
        """Take the work queued by re-entering calls, and count it; with the lock held."""
        taken: list[TaskFuture[Any]] = []
        reentered = self._reentered
        while reentered:  # one at a time: a call re-entering this loop only appends
            taken.append(reentered.popleft())
        self._submitted += len(taken)
        return taken

    def _request_cancel(self, future: TaskFuture[Any]) -> None:
        self._call_soon(_cancel_in_loop, future)

    def _request_stop(self, cancel: bool) -> None:
        """Stop accepting work; finish (or with ``cancel``, cancel) what was accepted."""
        if self._forked:
            return  # nothing runs here to stop: the loop is in the parent process
        # Safe to re-enter (a signal handler's shutdown landing in any section of this
        # thread): every write below only ever moves the stop forward.
        with self._lock:
            self._closed = True
            # One store of what was asked and what is there (no call, so no handler can
            # run in between): a request that landed after the read, and did all this
            # already, is never downgraded by this one.
            self._stop_request = cancel = cancel or self._stop_request or False
            # A repeated request is sent again, not skipped: an interrupt (a Ctrl-C)
            # between recording the first and sending it would otherwise leave a stop
            # that never reaches the loop. Sending it twice is harmless.
            started = self._runtime is not None
            loop_running = self._token is not None
            queued = [f for f in (*self._inbox, *self._reentered) if not f._taken] if cancel else []
        for future in queued:
            future.cancel()
        if started:
            self._call_soon(self._stop_in_loop, cancel)
        elif cancel and loop_running:
            self._call_soon(self._cancel_startup)

    @property
    def _unfinished(self) -> int:
        """Tasks submitted here and not yet over: the load a scheduler sees."""
        # Two reads without a lock: off by one in a race, never wrong for long.
        return max(self._submitted - self._exited_count, 0)

    def _statistics(self) -> WorkerStatistics:
        with self._exit_lock:
            completed, failed, cancelled = self._completed, self._failed, self._cancelled
        if self._exits_handed_over:  # exits that interrupted the section above
            self._record_handed_over()
        unfinished = self._unfinished
        running = min(self._active, unfinished)  # read without the loop's cooperation
        return WorkerStatistics(
            index=self._index,
            running=running,
            queued=unfinished - running,
            completed=completed,
            failed=failed,
            cancelled=cancelled,
            restarts=self._restarts,
            stalls=self._stalls,
            loop_lag=self._loop_lag,
        )

    def _check_heartbeat(self, now: float, stall_timeout: float) -> None:
        """Called by the stall watchdog: ping the loop, or report a ping left unanswered."""
        sent = self._ping_sent
        if sent is None:
            if self._runtime is not None:
                self._ping_sent = now
                self._stall_reported = False
                self._call_soon(self._answer_ping, now)
            return
        waited = now - sent
        self._loop_lag = waited
        if waited < stall_timeout or self._stall_reported:
            return
        self._stall_reported = True  # once per stall, however long it lasts
        self._stalls += 1
        frame = sys._current_frames().get(self._thread_ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
        logger.warning(
            "worker %d's event loop has not responded for %.2f s (stall %d); "
            "something is blocking it. Its thread is at:\n%s",
            self._index,
            waited,
            self._stalls,
            stack,
        )

    def _answer_ping(self, sent: float) -> None:
        self._loop_lag = time.monotonic() - sent
        self._ping_sent = None

    def _after_fork_in_child(self) -> None:
        """In a child made by ``os.fork()``: refuse all use, fail the work in flight.

        Only the forking thread exists in the child, so the locks may be held by
        threads that are gone: they are replaced, not taken.
        """
        self._lock = threading.RLock()
        self._exit_lock = threading.RLock()
        self._forked = True
        self._closed = True
        self._thread_ident = None
        self._token = None
        self._portal = None
        runtime, self._runtime = self._runtime, None
        in_flight = [*self._inbox, *self._reentered, *self._waiting]
        self._inbox.clear()
        self._reentered.clear()
        self._waiting.clear()
        if runtime is not None:
            in_flight += runtime.unfinished() + runtime.never_started()
            runtime.close()
        broken = BrokenPortalPool(FORK_MESSAGE)
        for future in in_flight:
            future._after_fork_in_child()
            future._settle_broken(broken)

    def _check_not_own_loop(self, what: str) -> None:
        if self._thread_ident == threading.get_ident():
            raise RuntimeError(
                f"{what} from inside worker {self._index}'s own event loop would "
                f"deadlock; use 'await pool.run_async(...)' there instead"
            )

    # -- loop side ---------------------------------------------------------------

    def _call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        # Undeliverable calls are dropped on purpose: a loop that is gone is either being
        # replaced (the next one drains the inbox) or the worker is ending (its thread
        # fails what is queued), and the tasks it ran are settled by the supervisor.
        token = self._token
        if token is not None:
            call_soon_or_drop(token, fn, *args)

    def _drain(self) -> None:
        runtime = self._runtime
        if runtime is None or not runtime.accepting:
            return  # a dying loop: the inbox waits for the next one
        with self._lock:
            self._wake_pending = False
            batch, self._inbox = self._inbox, deque()
            if self._reentered:
                batch.extend(self._take_reentered())
        if self._max_concurrency is None:
            self._active += len(batch)
            start = runtime.start
            for future in batch:
                start(future)  # a cancelled future's task returns at its first step
        else:
            self._waiting.extend(batch)
            self._start_waiting(runtime)

    def _start_waiting(self, runtime: Runtime) -> None:
        limit = self._max_concurrency
        assert limit is not None
        if self._starting_waiting:
            # Re-entered by a task that an eager task factory ran to its end inside
            # start(): the loop below sees the freed slot, and the stack stays flat.
            return
        self._starting_waiting = True
        try:
            waiting = self._waiting
            while waiting and self._active < limit:
                future = waiting.popleft()
                if future._state == PENDING:  # skip work cancelled while it waited
                    self._active += 1
                    runtime.start(future)
        finally:
            self._starting_waiting = False

    def _task_ended(self) -> None:
        self._active -= 1
        runtime = self._runtime
        if self._waiting and runtime is not None and runtime.accepting:
            self._start_waiting(runtime)

    def _record_exit(self, future: TaskFuture[Any]) -> None:
        if self._exit_lock._is_owned():  # type: ignore[attr-defined]
            # This thread was interrupted inside the section below, or _statistics', by
            # a call that ended a future (a signal handler's cancel, a __del__, ...):
            # counting here could be overwritten by the rest of that section. The whole
            # record waits until the section is over (see _record_handed_over).
            self._exits_handed_over.append(future)
            return
        state = future._state
        with self._exit_lock:
            self._exited_count += 1
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                self._cancelled += 1
            elif future._exception is not None:
                self._failed += 1
            else:
                self._completed += 1
        if self._pending_limit is not None:
            self._pending_limit.release()
        if self._exits_handed_over:
            self._record_handed_over()

    def _record_handed_over(self) -> None:
        # Not while an outer section of this thread still holds the lock (stats() from a
        # handler, say): that section records them when it leaves. Recording one can be
        # interrupted in turn: hence the loop.
        handed_over = self._exits_handed_over
        while handed_over and not self._exit_lock._is_owned():  # type: ignore[attr-defined]
            with suppress(IndexError):  # another thread took the last one meanwhile
                self._record_exit(handed_over.popleft())

    def _cancelled_by_stop(self, future: TaskFuture[Any]) -> bool:
        """At a call's first step: cancel it if a cancelling stop came first; ``True`` if so.

        The flag is set before ``shutdown(cancel_futures=True)`` returns, so no call
        starts after that, wherever it waited: in the inbox, or in a task or runner that
        the loop made for it before the stop reached the loop. A call the worker had
        taken (see _enqueue) counts as started: it runs, and is cancelled with the
        running tasks.
        """
        # Read without the lock: it is only ever set, and True is its last value.
        if self._stop_request is not True or future._taken:
            return False
        future.cancel()
        return True

    def _requeue(self, future: TaskFuture[Any]) -> None:
        with self._lock:
            self._inbox.appendleft(future)

    def _stop_in_loop(self, cancel: bool) -> None:
        self._drain()
        if cancel:
            for future in self._waiting:  # loop-owned, so cancelled here
                future.cancel()
        assert self._runtime is not None
        self._runtime.request_stop(cancel)

    def _thread_main(self) -> None:
        self._thread_ident = threading.get_ident()
        _thread_state.worker = self
        try:
            # Supervision: a loop that dies on its own (not stopped by us) is replaced by
            # a new loop, portal and worker_context; queued work waits for it. A loop that
            # cannot even start again, or keeps failing as soon as it starts (a
            # worker_context that fails or ends at once), leaves the worker broken rather
            # than spinning.
            restarted: deque[float] = deque(maxlen=RESTART_BURST)  # their times
            while True:
                failure, accepted = self._run_one_loop()
                with self._lock:
                    stopping = self._stop_request is not None
                if failure is None or stopping or (not accepted and not restarted):
                    break  # stopped, or a failed start, which PortalPool(...) reports
                now = time.monotonic()
                if not accepted:
                    why = "failed and its replacement could not start"
                elif len(restarted) == RESTART_BURST and now - restarted[0] < RESTART_WINDOW:
                    why = f"failed again after {RESTART_BURST} restarts in {RESTART_WINDOW:g} s"
                else:
                    restarted.append(now)
                    self._restarts += 1
                    logger.warning(
                        "worker %d's event loop failed; restarting it (restart %d)",
                        self._index,
                        self._restarts,
                        exc_info=failure,
                    )
                    continue
                logger.error(
                    "worker %d's event loop %s; the worker is broken: work sent to it "
                    "fails with BrokenPortalPool",
                    self._index,
                    why,
                    exc_info=failure,
                )
                break
        finally:
            with self._lock:
                self._closed = True
            self._fail_queued(BrokenPortalPool(f"worker {self._index}'s event loop stopped"))
            self._context = None
            _thread_state.worker = None
            # Thread idents are reused once a thread ends: forget ours before that.
            self._thread_ident = None
            self._exited.set_result(None)

    def _run_one_loop(self) -> tuple[BaseException | None, bool]:
        """Run one event loop to its end; return why it ended and if it accepted work."""
        self._failure = None
        try:
            anyio.run(
                self._serve_portal,
                backend=self._backend,
                backend_options=self._backend_options,
            )
        except BaseException as exc:  # reported by the supervisor and the futures
            self._failure = exc
        if self._spawner is not None:
            self._spawner.join()  # it ended as soon as the main task was spawned
            self._spawner = None
        failure = self._failure
        with self._lock:
            runtime, self._runtime = self._runtime, None
            if runtime is not None:
                runtime.close()
            # Work held back by max_concurrency never started: it waits for the next
            # loop, in front of what arrived since.
            self._inbox.extendleft(reversed(self._waiting))
            self._waiting.clear()
            self._active = 0
            self._ping_sent = None  # a ping the dead loop never answered is no stall
            self._token = None
            self._portal = None
            self._startup_scope = None
            # Until the next loop drains the inbox, submitters only append to it.
            self._wake_pending = True
        if failure is not None and not self._ready.done():
            self._ready.set_exception(failure)
        if runtime is not None:
            for future in runtime.never_started():
                if future._state == PENDING:
                    self._requeue(future)
        if runtime is not None and failure is not None:
            broken = BrokenPortalPool(
                f"worker {self._index}'s event loop failed: {safe_repr(failure)}"
            )
            for future in runtime.unfinished():
                future._settle_broken(broken)
        return failure, runtime is not None

    async def _serve_portal(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            with self._lock:
                self._token = current_token()
            # The main task must belong to the portal's task group, and the public way
            # in, start_task_soon, must be called from another thread: use a short-lived
            # one (anyio.to_thread would leave trio's idle cache threads behind).
            self._spawner = threading.Thread(
                target=portal.start_task_soon,
                args=(self._main,),
                name=f"{self._thread.name}-spawn",
            )
            self._spawner.start()
            await portal.sleep_until_stopped()

    async def _main(self) -> None:
        portal = self._portal
        assert portal is not None
        try:
            _task_worker.set(self)  # before the runtime copies this task's context
            with anyio.CancelScope() as startup:
                with self._lock:
                    self._startup_scope = startup
                    if self._stop_request is True:
                        startup.cancel()  # Ctrl-C or a failed sibling before we began
                async with AsyncExitStack() as stack:
                    if self._context_factory is not None:
                        self._context = await stack.enter_async_context(
                            _open_context(self._context_factory)
                        )
                    # Made only now: its tasks start in copies of the context as
                    # worker_context left it, and serve() publishes it at once, so the
                    # supervisor closes whatever was made.
                    runtime = make_runtime(self._backend, self)
                    await runtime.serve(lambda: self._accept_work(runtime))
            with self._lock:
                stopping = self._stop_request is not None
            if not stopping:
                # serve() returns only when stopped, so the worker_context ended its own
                # body: a cancel scope or timeout around its yield caught the cancellation
                # it sent, or it swallowed an error. A failure, for the supervisor.
                self._failure = RuntimeError(
                    f"worker {self._index}'s worker_context ended before the pool stopped "
                    f"it; a cancel scope, timeout or exception handler around its yield "
                    f"must not end its body"
                )
            elif not self._ready.done():
                self._ready.set_exception(
                    BrokenPortalPool(f"worker {self._index} was stopped while starting")
                )
        except BaseException as exc:  # reported by the supervisor; the portal still stops
            with self._lock:
                stopping = self._stop_request is not None
            if stopping and self._runtime is not None:
                # Shutdown goes on: the worker_context's exit failed, or cleanup did.
                logger.error("worker %d failed while stopping", self._index, exc_info=exc)
            else:
                self._failure = exc
        finally:
            await portal.stop()

    def _cancel_startup(self) -> None:
        # Only while the context is being entered: once serving, stops go through the
        # runtime, which lets accepted work finish or cancels it as asked.
        if self._runtime is None and self._startup_scope is not None:
            self._startup_scope.cancel()

    def _accept_work(self, runtime: Runtime) -> None:
        with self._lock:
            self._runtime = runtime
            stop = self._stop_request
        if not self._ready.done():
            self._ready.set_result(None)
        self._drain()  # work queued while a previous loop was being replaced
        if stop is not None:
            self._stop_in_loop(stop)

    def _fail_queued(self, exc: BaseException) -> None:
        with self._lock:
            batch, self._inbox = self._inbox, deque()
            batch.extend(self._take_reentered())
            self._wake_pending = False
        for future in batch:
            future._settle_broken(exc)


def _cancel_in_loop(future: TaskFuture[Any]) -> None:
    canceller = future._canceller
    if canceller is not None:
        canceller.cancel()


def _check_not_in_pool_loop(limit: PendingLimit) -> None:
    """Refuse to wait for room from a loop of the same pool: the room may never come."""
    worker: Worker[Any] | None = getattr(_thread_state, "worker", None)
    if worker is not None and worker._pending_limit is limit:
        raise RuntimeError(
            f"the pool is full (max_pending={limit.limit}) and waiting for room inside "
            f"one of its own loops could deadlock; use 'await pool.run_async(...)' there"
        )


def wait_for_result(future: Future[T]) -> T:
    """Block on ``future``; if the wait itself is interrupted, cancel the work."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def _open_context(factory: Callable[[], Any]) -> AbstractAsyncContextManager[Any]:
    manager = factory()
    if not (hasattr(manager, "__aenter__") and hasattr(manager, "__aexit__")):
        raise TypeError(
            f"worker_context must be a zero-argument callable returning an async context "
            f"manager, but it returned {type(manager).__name__}; wrap an async generator "
            f"with @contextlib.asynccontextmanager"
        )
    return manager  # type: ignore[no-any-return]
