"""A worker: the pool's handle on one event loop, wherever that loop lives.

The worker holds what every host shares: the inbox that ``submit`` appends to, admission
(``max_pending``), the stop request, the counters behind ``stats()``, and the ready and
exited futures. Where the loop runs, and how work crosses to it, is its host's
(:mod:`portal_pool._host`): a thread of this process, or a child process.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, overload

import anyio
from anyio.lowlevel import current_token

from ._callables import check_callable
from ._counts import TaskCounts
from ._exceptions import BrokenPortalPool
from ._flow import FORK_MESSAGE, SHUTDOWN_MESSAGE, PendingLimit
from ._future import TaskFuture
from ._tokens import call_soon_or_drop, wait_for_result

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ._host import Host, HostedLoop, LoopSettings, Waker

T = TypeVar("T")
P = ParamSpec("P")
C_co = TypeVar("C_co", covariant=True)

# The worker whose loop runs in the current thread, set by the thread host.
_thread_state = threading.local()

# The worker whose task runs the current code, in every task's context: unlike the
# thread-local above, it follows a task's call into anyio.to_thread, asyncio.to_thread
# and trio.to_thread, which copy the context, so a blocking call made there that would
# wait for that same task can be refused instead of deadlocking.
_task_worker: ContextVar[Worker[Any] | None] = ContextVar("portal_pool_task_worker", default=None)


def current_worker() -> Worker[Any]:
    """Return the worker whose event loop runs the calling code.

    In a worker process, that is the process's own worker, with the ``index`` it has in
    the parent's pool.

    :raises RuntimeError: if called outside a portal_pool worker's loop thread
    """
    worker: Worker[Any] | None = getattr(_thread_state, "worker", None)
    if worker is None:
        raise RuntimeError(
            "current_worker() was called outside a portal_pool worker; call it from "
            "code submitted to a PortalPool"
        )
    return worker


class Worker(TaskCounts, Generic[C_co]):
    """The pool's handle on one event loop, with its own inbox.

    :meth:`submit` appends to a deque and wakes the loop side once per burst rather
    than once per item, and never waits for the loop. That is why ``submit`` is safe
    from any thread, including one that runs its own asyncio or trio loop, where
    anyio's blocking portal calls would hang (trio) or block.
    """

    def __init__(self, index: int, host: Host, settings: LoopSettings) -> None:
        self._index = index
        self._backend = settings.backend
        self._pending_limit = settings.pending_limit
        # Guards the inbox and the flags below; held only for a few bytecodes. Reentrant
        # only so that a submit or a stop re-entering a section in the thread that holds
        # it (a signal handler, __del__ or weakref callback, which Python may run
        # between any two bytecodes) can tell, with the lock's owner check, instead of
        # waiting for itself: see _enqueue_reentered and _request_stop.
        self._lock = threading.RLock()
        # A deque, swapped out whole by the loop side: producers never wait for the
        # loop, and the loop takes a whole burst with one lock acquisition.
        self._inbox: deque[TaskFuture[Any]] = deque()
        # Work submitted by such re-entering calls: only the loop side's take reads it,
        # and counts it as submitted (see _take_reentered).
        self._reentered: deque[TaskFuture[Any]] = deque()
        # Set by the host, under the lock, while its loop takes work; None before that
        # and while a loop is being replaced: submitters then only append.
        self._waker: Waker | None = None
        self._wake_pending = False
        self._closed = False
        self._forked = False  # a copy of the worker in a child made by os.fork()
        self._stop_request: bool | None = None  # None, or the cancel flag of the stop
        self._broken_by: str | None = None  # why the host gave up on the loop, if it did
        self._ready: Future[None] = Future()
        self._exited: Future[None] = Future()
        # The thread that runs this worker's loop in this process (thread host only).
        self._thread_ident: int | None = None
        # Tasks the loop side has started and not yet ended; written by the host.
        self._active = 0
        self._submitted = 0  # counted under self._lock; exits under the counts' own
        self._init_counts()
        # Made last: a host may read any of the above while it sets up.
        self._host_loop: HostedLoop = host._host_worker(self, settings)
        # The host's encoding of a call, for a loop in another process; None for threads.
        self._encode: Callable[..., tuple[Any, ...]] | None = host._call_encoder()

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a Worker cannot be sent to a worker process; inside a task, "
            "current_worker() gives the worker that runs it"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Worker {self._index} {self._backend} {state}>"

    # -- public ------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The worker's position in ``pool.workers``."""
        return self._index

    @property
    def pid(self) -> int:
        """The id of the process that runs this worker's loop."""
        return self._host_loop.pid

    @property
    def node(self) -> str | None:
        """The Ray node id of the worker's actor; ``None`` on the thread and process hosts."""
        return self._host_loop.node

    @property
    def portal(self) -> BlockingPortal:
        """The anyio portal of this worker's loop, for power users.

        Its blocking methods must not be called from a thread running a trio loop, and
        they wait for the loop to respond; :meth:`submit` has neither limit.

        :raises RuntimeError: if the loop is not running, or runs in another process
        """
        return self._host_loop.portal

    @property
    def context(self) -> C_co:
        """The value yielded by the pool's ``worker_context`` in this worker, or ``None``.

        :raises RuntimeError: if the loop runs in another process, where the value lives
        """
        return self._host_loop.context  # type: ignore[no-any-return]

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
            if self._encode is not None:
                fn, args, kwargs = self._encode(fn, args, kwargs)
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
        try:
            if self._encode is not None:
                fn, args, kwargs = self._encode(fn, args, kwargs)
            future: TaskFuture[Any] = TaskFuture(self, fn, args, kwargs)
            future._on_task_exit = on_task_exit
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
        self._host_loop.start()

    def _enqueue(self, future: TaskFuture[Any]) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._enqueue_reentered(future)
            return
        with self._lock:
            if self._closed:
                raise self._refusal()
            # None until the loop accepts work; it then takes what came before.
            waker = self._waker
            if waker is not None and self._submitted == self._exited_count:
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
            # Woken under the lock, so the waker cannot be closed meanwhile.
            if waker is not None:
                waker.wake()

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
        # No other thread is in a section meanwhile, so the waker cannot be closed.
        waker = self._waker
        if waker is not None:
            waker.wake()

    def _refusal(self) -> Exception:
        """Why a closed worker refuses work."""
        if self._forked:
            return BrokenPortalPool(FORK_MESSAGE)
        if self._stop_request is None:
            why = "" if self._broken_by is None else f": {self._broken_by}"
            return BrokenPortalPool(f"worker {self._index}'s event loop has stopped{why}")
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
        self._host_loop.cancel(future)

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
            queued = [f for f in (*self._inbox, *self._reentered) if not f._taken] if cancel else []
        for future in queued:
            future.cancel()
        # A repeated request is sent again, not skipped: an interrupt (a Ctrl-C) between
        # recording the first and sending it would otherwise leave a stop that never
        # reaches the loop. Sending it twice is harmless.
        self._host_loop.stop(cancel)

    def _check_not_own_loop(self, what: str) -> None:
        if self._thread_ident == threading.get_ident():
            raise RuntimeError(
                f"{what} from inside worker {self._index}'s own event loop would "
                f"deadlock; await run_async(...) of the pool or the worker there instead"
            )

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
        self._waker = None
        in_flight = [*self._inbox, *self._reentered, *self._host_loop.after_fork_in_child()]
        self._inbox.clear()
        self._reentered.clear()
        broken = BrokenPortalPool(FORK_MESSAGE)
        for future in in_flight:
            future._after_fork_in_child()
            future._settle_broken(broken)

    # -- called by the host -----------------------------------------------------------

    def _take_inbox(self) -> deque[TaskFuture[Any]]:
        """Take everything queued, as one burst; the next submit wakes the loop again."""
        with self._lock:
            self._wake_pending = False
            batch, self._inbox = self._inbox, deque()
            if self._reentered:
                batch.extend(self._take_reentered())
        return batch

    def _requeue(self, future: TaskFuture[Any]) -> None:
        with self._lock:
            self._inbox.appendleft(future)

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

    def _fail_queued(self, exc: BaseException) -> None:
        with self._lock:
            batch, self._inbox = self._inbox, deque()
            batch.extend(self._take_reentered())
            self._wake_pending = False
        for future in batch:
            future._settle_broken(exc)


def _check_not_in_pool_loop(limit: PendingLimit) -> None:
    """Refuse to wait for room from a loop of the same pool: the room may never come."""
    worker: Worker[Any] | None = getattr(_thread_state, "worker", None)
    if worker is not None and worker._pending_limit is limit:
        raise RuntimeError(
            f"the pool is full (max_pending={limit.limit}) and waiting for room inside "
            f"one of its own loops could deadlock; use 'await pool.run_async(...)' there"
        )
