"""The thread host: each worker's event loop in a thread of this process.

One thread, one ``anyio.run``, one :class:`~anyio.from_thread.BlockingPortal`. The
worker's main task runs inside the portal's task group, enters ``worker_context``, and
serves the worker's inbox through the backend's runtime until it is stopped. A loop that
dies on its own is replaced (supervision); the stall watchdog pings it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
from anyio.from_thread import BlockingPortal
from anyio.lowlevel import EventLoopToken, current_token

from ._callables import open_worker_context
from ._exceptions import BrokenPortalPool, safe_repr
from ._future import PENDING, TaskFuture
from ._host import cpu_count
from ._supervision import RestartPolicy
from ._tokens import call_soon_or_drop
from ._watchdog import Heartbeat
from ._worker import _task_worker, _thread_state

if TYPE_CHECKING:
    from ._host import LoopSettings
    from ._runtime import Runtime
    from ._worker import Worker

logger = logging.getLogger("portal_pool")


class ThreadHost:
    """Each worker's event loop runs in a thread of this process.

    The default, and the first choice for I/O on any build of Python, and for CPU work
    on a free-threaded one: calls and results are passed as they are, with no copies.
    """

    name = "thread"

    def __repr__(self) -> str:
        return "ThreadHost()"

    def _host_worker(self, worker: Worker[Any], settings: LoopSettings) -> ThreadLoop:
        return ThreadLoop(worker, settings)

    def _default_max_workers(self) -> int:
        return cpu_count()

    def _call_encoder(self) -> None:
        return None  # calls are passed as they are


def make_runtime(backend: str, feeder: ThreadLoop) -> Runtime:
    """The runtime for ``backend``, serving the loop side ``feeder``."""
    if backend == "trio":
        from ._trio_runtime import TrioRuntime

        return TrioRuntime(feeder)
    from ._asyncio_runtime import AsyncioRuntime

    return AsyncioRuntime(feeder)


class ThreadLoop:
    """One worker's loop in a thread: the :class:`~portal_pool._host.HostedLoop` of threads.

    The worker's lock guards this object's ``_runtime`` and ``_token`` too: submitters
    wake the runtime under it, so the runtime is never closed under them.
    """

    def __init__(self, worker: Worker[Any], settings: LoopSettings) -> None:
        self._worker = worker
        self._index = worker.index
        self._backend = settings.backend
        self._backend_options = settings.backend_options
        self._context_factory = settings.context_factory
        self._context: Any = None
        self._portal: BlockingPortal | None = None
        self._token: EventLoopToken | None = None
        self._runtime: Runtime | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"{settings.thread_name_prefix}-{self._index}"
        )
        self._spawner: threading.Thread | None = None
        self._startup_scope: anyio.CancelScope | None = None
        self._failure: BaseException | None = None
        # Flow control, in the loop thread only: work held back by max_concurrency
        # (never started, so cancelling it is free).
        self._max_concurrency = settings.max_concurrency
        self._waiting: deque[TaskFuture[Any]] = deque()
        self._starting_waiting = False
        self._heartbeat = Heartbeat(worker, self._call_soon)

    # -- the worker's side ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def node(self) -> None:
        return None  # one machine

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeError(f"worker {self._index} has no running portal")
        return self._portal

    @property
    def context(self) -> Any:
        return self._context

    def start(self) -> None:
        self._thread.start()

    def cancel(self, future: TaskFuture[Any]) -> None:
        self._call_soon(_cancel_in_loop, future)

    def stop(self, cancel: bool) -> None:
        with self._worker._lock:
            started = self._runtime is not None
            loop_running = self._token is not None
        if started:
            self._call_soon(self._stop_in_loop, cancel)
        elif cancel and loop_running:
            self._call_soon(self._cancel_startup)

    def started(self) -> bool:
        return self._thread.ident is not None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def terminate(self) -> None:
        pass  # a thread cannot be ended from outside: the process ends around it

    def check_heartbeat(self, now: float, stall_timeout: float) -> None:
        if self._runtime is not None or self._heartbeat.ping_in_flight:
            self._heartbeat.check(now, stall_timeout)

    def after_fork_in_child(self) -> list[TaskFuture[Any]]:
        self._token = None
        self._portal = None
        runtime, self._runtime = self._runtime, None
        held = list(self._waiting)
        self._waiting.clear()
        if runtime is not None:
            held += runtime.unfinished() + runtime.never_started()
            runtime.close()
        return held

    # -- the runtime's side (the Feeder protocol), in the loop thread -------------------

    def _drain(self) -> None:
        runtime = self._runtime
        if runtime is None or not runtime.accepting:
            return  # a dying loop: the inbox waits for the next one
        batch = self._worker._take_inbox()
        if self._max_concurrency is None:
            self._worker._active += len(batch)
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
        worker = self._worker
        try:
            waiting = self._waiting
            while waiting and worker._active < limit:
                future = waiting.popleft()
                if future._state == PENDING:  # skip work cancelled while it waited
                    worker._active += 1
                    runtime.start(future)
        finally:
            self._starting_waiting = False

    def _task_ended(self) -> None:
        self._worker._active -= 1
        runtime = self._runtime
        if self._waiting and runtime is not None and runtime.accepting:
            self._start_waiting(runtime)

    def _requeue(self, future: TaskFuture[Any]) -> None:
        self._worker._requeue(future)

    def _cancelled_by_stop(self, future: TaskFuture[Any]) -> bool:
        return self._worker._cancelled_by_stop(future)

    # -- the loop thread ----------------------------------------------------------------

    def _call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        # Undeliverable calls are dropped on purpose: a loop that is gone is either being
        # replaced (the next one drains the inbox) or the worker is ending (its thread
        # fails what is queued), and the tasks it ran are settled by the supervisor.
        token = self._token
        if token is not None:
            call_soon_or_drop(token, fn, *args)

    def _stop_in_loop(self, cancel: bool) -> None:
        self._drain()
        if cancel:
            for future in self._waiting:  # loop-owned, so cancelled here
                future.cancel()
        assert self._runtime is not None
        self._runtime.request_stop(cancel)

    def _thread_main(self) -> None:
        worker = self._worker
        worker._thread_ident = threading.get_ident()
        _thread_state.worker = worker
        try:
            # Supervision: a loop that dies on its own (not stopped by us) is replaced by
            # a new loop, portal and worker_context; queued work waits for it. A loop that
            # cannot even start again, or keeps failing as soon as it starts (a
            # worker_context that fails or ends at once), leaves the worker broken rather
            # than spinning.
            policy = RestartPolicy()
            while True:
                failure, accepted = self._run_one_loop()
                with worker._lock:
                    stopping = worker._stop_request is not None
                if failure is None or stopping or (not accepted and not policy.restarted):
                    break  # stopped, or a failed start, which PortalPool(...) reports
                why = policy.gives_up(accepted)
                if why is None:
                    worker._restarts += 1
                    logger.warning(
                        "worker %d's event loop failed; restarting it (restart %d)",
                        self._index,
                        worker._restarts,
                        exc_info=failure,
                    )
                    continue
                worker._broken_by = f"it {why}"
                logger.error(
                    "worker %d's event loop %s; the worker is broken: work sent to it "
                    "fails with BrokenPortalPool",
                    self._index,
                    why,
                    exc_info=failure,
                )
                break
        finally:
            with worker._lock:
                worker._closed = True
            worker._fail_queued(BrokenPortalPool(f"worker {self._index}'s event loop stopped"))
            self._context = None
            _thread_state.worker = None
            # Thread idents are reused once a thread ends: forget ours before that.
            worker._thread_ident = None
            worker._exited.set_result(None)

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
        worker = self._worker
        with worker._lock:
            runtime, self._runtime = self._runtime, None
            worker._waker = None  # until the next loop, submitters only append
            if runtime is not None:
                runtime.close()
            # Work held back by max_concurrency never started: it waits for the next
            # loop, in front of what arrived since.
            worker._inbox.extendleft(reversed(self._waiting))
            self._waiting.clear()
            worker._active = 0
            self._heartbeat.forget_ping()  # one the dead loop never answered is no stall
            self._token = None
            self._portal = None
            self._startup_scope = None
            # Until the next loop drains the inbox, submitters only append to it.
            worker._wake_pending = True
        if failure is not None and not worker._ready.done():
            worker._ready.set_exception(failure)
        if runtime is not None:
            for future in runtime.never_started():
                if future._state == PENDING:
                    worker._requeue(future)
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
            with self._worker._lock:
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
        worker = self._worker
        try:
            _task_worker.set(worker)  # before the runtime copies this task's context
            with anyio.CancelScope() as startup:
                with worker._lock:
                    self._startup_scope = startup
                    if worker._stop_request is True:
                        startup.cancel()  # Ctrl-C or a failed sibling before we began
                async with AsyncExitStack() as stack:
                    if self._context_factory is not None:
                        self._context = await stack.enter_async_context(
                            open_worker_context(self._context_factory)
                        )
                    # Made only now: its tasks start in copies of the context as
                    # worker_context left it, and serve() publishes it at once, so the
                    # supervisor closes whatever was made.
                    runtime = make_runtime(self._backend, self)
                    await runtime.serve(lambda: self._accept_work(runtime))
            with worker._lock:
                stopping = worker._stop_request is not None
            if not stopping:
                # serve() returns only when stopped, so the worker_context ended its own
                # body: a cancel scope or timeout around its yield caught the cancellation
                # it sent, or it swallowed an error. A failure, for the supervisor.
                self._failure = RuntimeError(
                    f"worker {self._index}'s worker_context ended before the pool stopped "
                    f"it; a cancel scope, timeout or exception handler around its yield "
                    f"must not end its body"
                )
            elif not worker._ready.done():
                worker._ready.set_exception(
                    BrokenPortalPool(f"worker {self._index} was stopped while starting")
                )
        except BaseException as exc:  # reported by the supervisor; the portal still stops
            with worker._lock:
                stopping = worker._stop_request is not None
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
        worker = self._worker
        with worker._lock:
            self._runtime = runtime
            worker._waker = runtime
            stop = worker._stop_request
        if not worker._ready.done():
            worker._ready.set_result(None)
        self._drain()  # work queued while a previous loop was being replaced
        if stop is not None:
            self._stop_in_loop(stop)


def _cancel_in_loop(future: TaskFuture[Any]) -> None:
    canceller = future._canceller
    if canceller is not None:
        canceller.cancel()
