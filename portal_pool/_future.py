"""The pool's future: a ``concurrent.futures.Future`` that can also stop a running task."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import (  # the states are not re-exported publicly
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from threading import Thread, get_ident
from typing import Any, Protocol, TypeVar

from ._condition import FutureCondition

T = TypeVar("T")

__all__ = [
    "CANCELLED",
    "CANCELLED_AND_NOTIFIED",
    "FINISHED",
    "PENDING",
    "RUNNING",
    "Outcome",
    "TaskFuture",
]

# A call's outcome as it travels: (True, value) or (False, exception).
Outcome = tuple[bool, Any]


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


class _Owner(Protocol):
    """The worker a future belongs to, as the future sees it."""

    # The thread that runs the owner's loop in this process, if any: waiting there for
    # one of its own futures would deadlock.
    _thread_ident: int | None

    def _request_cancel(self, future: TaskFuture[Any]) -> None: ...

    def _record_exit(self, future: TaskFuture[Any]) -> None: ...

    def _check_not_own_loop(self, what: str) -> None: ...


class TaskFuture(Future[T]):
    """A future whose :meth:`cancel` also reaches a task that is already running.

    ``concurrent.futures.Future.cancel()`` refuses once the work has started, because a
    thread cannot be interrupted. A task in an event loop can: cancelling this future
    while the task runs marks the future cancelled at once (so ``cancel()``,
    ``cancelled()`` and ``result()`` stay consistent) and delivers a cancellation to the
    task in its loop, where its ``finally`` blocks run. The pool's shutdown waits for that
    cleanup.

    The callable and its arguments ride on the future itself, which saves one object per
    submit on the hot path; they are dropped as soon as the task starts or is cancelled.
    """

    # The call waiting to run, then the in-loop canceller of the running task.
    _call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None
    # The running task's handle in its loop: an asyncio Task, or the trio runner's
    # CancelScope (only while this call runs). The object itself, not its bound cancel
    # method, which would be one more allocation per task on the hot path.
    _canceller: _Cancellable | None
    # Called once, when the task has fully exited or will never run (see run_async).
    _on_task_exit: Callable[[], object] | None
    # Set (in the submitting thread) when an idle worker took the call; see
    # Worker._enqueue. A class default, so that the submit path pays nothing for it.
    _taken: bool = False
    # The lists behind _waiters and _done_callbacks, once made.
    _waiter_list: list[Any] | None = None
    _callback_list: list[Callable[[Future[Any]], object]] | None = None

    def __init__(
        self,
        worker: _Owner,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        # Future.__init__, field for field (the same on 3.10 to 3.14; a test compares
        # them), with a slimmer condition and the two lists made on first use:
        # threading.Condition builds five bound methods, a dict and a deque per instance,
        # and at tens of thousands of live futures that garbage is what the cyclic
        # collector spends its time on.
        self._condition = FutureCondition()  # type: ignore[assignment]
        self._state = PENDING
        self._result = None
        self._exception = None
        self._worker = worker
        self._call = (fn, args, kwargs)
        self._canceller = None
        self._on_task_exit = None
        self._started = False  # set once, in the loop thread, when the task begins
        self._exit_recorded = False  # see _task_exited

    # Future's own methods use these two lists, always under the lock (wait() and
    # as_completed() add waiters, add_done_callback() callbacks); most futures never
    # have either, so they are made on first use, under that lock.

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]  # pyright: ignore[reportIncompatibleVariableOverride]
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        callbacks = self._callback_list
        if callbacks is None:
            callbacks = self._callback_list = []
        return callbacks

    def cancel(self) -> bool:
        """Cancel the work, whether it is waiting or already running.

        :return: ``False`` if the work has already finished, else ``True``
        """
        condition: FutureCondition = self._condition  # type: ignore[assignment]
        if condition._is_owned():  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
            return self._cancel_reentered(condition)
        previous = self._transition_to_cancelled()
        if previous is None:
            return self._state != FINISHED
        if previous == RUNNING:
            self._worker._request_cancel(self)
        else:
            self._task_exited()
        return True

    def _cancel_reentered(self, condition: FutureCondition) -> bool:
        # This thread holds the future's lock: a signal handler, __del__ or weakref
        # callback interrupted it inside a section of this future (result(), wait(),
        # add_done_callback(), a state change). Cancelling in the middle of it could be
        # undone by its next line, or miss the waiter or callback it is installing: the
        # cancel runs as soon as that section lets go of the lock.
        state = self._state
        if state == FINISHED:
            return False
        if state in (PENDING, RUNNING):
            condition._hand_over(self.cancel)
        return True

    def set_running_or_notify_cancel(self) -> bool:
        return self._begin() is not None

    def result(self, timeout: float | None = None) -> T:
        # The thread check first: it is lock-free, and false on every normal call.
        if self._worker._thread_ident == get_ident() and not self.done():
            self._worker._check_not_own_loop("waiting for a future of this worker")
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._worker._thread_ident == get_ident() and not self.done():
            self._worker._check_not_own_loop("waiting for a future of this worker")
        return super().exception(timeout)

    # -- called by the worker, in its loop thread --------------------------------------

    def _begin(self) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
        """Turn ``RUNNING`` and hand over the call, or ``None`` if cancelled first.

        One step under the lock: a ``cancel()`` that lands just after it finds the task
        running and cancels it in its loop, rather than taking the call from under it.
        """
        with self._condition:
            if self._state == PENDING and not self._cancel_promised():
                self._state = RUNNING
                self._started = True
                call, self._call = self._call, None
                return call
            if self._state in (PENDING, CANCELLED, CANCELLED_AND_NOTIFIED):
                # cancel() has notified the waiters and dropped the call, or is about to
                # (it runs as this section lets go, and accounts for the task)
                return None
            raise RuntimeError(f"future in unexpected state {self._state}")

    def _cancel_promised(self) -> bool:
        """Whether a ``cancel()`` that re-entered a section of this future has returned
        ``True`` and waits to run as that section lets go (see :meth:`_cancel_reentered`);
        with the lock held.

        The task must then neither start nor finish first: another thread can take the
        lock between that section's end and the cancel, which the GIL made unlikely and
        the free-threaded build does not.
        """
        condition: FutureCondition = self._condition  # type: ignore[assignment]
        return condition._handed_over is not None

    def _settle(self, ok: bool, value: Any) -> None:
        """Record the task's outcome, unless the future was cancelled meanwhile."""
        self._canceller = None
        condition: FutureCondition = self._condition  # type: ignore[assignment]
        with condition:
            # Cancelled while the task ran, or about to be: cancel wins.
            promised = condition._handed_over is not None  # see _cancel_promised
            finished = not promised and self._finish(ok, value)
            # Claimed in the same section as the outcome (see _task_exited); the
            # exit itself is reported after the callbacks, as before.
            first_exit = not self._exit_recorded
            self._exit_recorded = True
        if finished:
            self._invoke_callbacks()
        elif promised:
            self._transition_to_cancelled()  # if the promised cancel has not run yet
        if first_exit:
            self._report_exit()

    def _finish(self, ok: bool, value: Any) -> bool:
        """What ``set_result`` or ``set_exception`` does under the lock, which is held
        here, so that checking for a promised cancel and finishing are one step; the
        caller then runs the callbacks, outside it. ``False`` if already done."""
        if self._state not in (PENDING, RUNNING):
            return False
        if ok:
            self._result = value
        else:
            self._exception = value
        self._state = FINISHED
        for waiter in self._waiter_list or ():
            if ok:
                waiter.add_result(self)
            else:
                waiter.add_exception(self)
        self._condition.notify_all()
        return True

    def _settle_cancelled(self) -> None:
        self._canceller = None
        self._transition_to_cancelled()
        self._task_exited()

    def _settle_broken(self, exc: BaseException) -> None:
        """End a future whose worker died, whatever state it was in."""
        self._canceller = None
        self._call = None
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING
        self._settle(False, exc)

    def _task_exited(self) -> None:
        """Account for the task's end, once per future, whoever reports it.

        Several paths may report the same end: cancel() of queued work, the task itself,
        and a dying worker failing what it held. Only the first counts, so every counter
        and the ``max_pending`` room stay exact.
        """
        with self._condition:
            if self._exit_recorded:
                return
            self._exit_recorded = True
        self._report_exit()

    def _report_exit(self) -> None:
        self._worker._record_exit(self)
        callback, self._on_task_exit = self._on_task_exit, None
        if callback is not None:
            callback()

    def _after_fork_in_child(self) -> None:
        # The thread that held this lock at the fork does not exist in the child.
        self._condition = FutureCondition()  # type: ignore[assignment]

    def _invoke_callbacks(self) -> None:
        # Future's own version logs an Exception and lets any other BaseException out,
        # into whatever settled the future: in a worker, that is the loop itself, and the
        # task's accounting would be skipped. A callback never ends its caller here.
        for callback in self._callback_list or ():
            try:
                callback(self)
            except BaseException:
                LOGGER.exception("exception calling callback for %r", self)

    # -- internals -------------------------------------------------------------------

    def _transition_to_cancelled(self) -> str | None:
        """Move to the cancelled state and wake waiters; return the previous state.

        Returns ``None`` when the future was already done. The base class leaves a
        cancelled future in ``CANCELLED`` until a worker picks it up; this one notifies
        ``wait()``/``as_completed()`` at once, because a cancelled item may sit behind
        others in its worker for a long time.
        """
        with self._condition:
            previous = self._state
            if previous not in (PENDING, RUNNING):
                return None
            self._state = CANCELLED_AND_NOTIFIED
            self._call = None
            for waiter in self._waiter_list or ():
                _tell_cancelled(waiter, self)
            self._condition.notify_all()
        self._invoke_callbacks()
        return previous


def _tell_cancelled(waiter: Any, future: TaskFuture[Any]) -> None:
    """``waiter.add_cancelled(future)``, from a thread of its own if it could deadlock here.

    ``wait()`` and ``as_completed()`` install stdlib waiters that take plain locks: their
    own and their event's. A cancel from a signal handler or ``__del__`` that interrupted
    this thread inside ``wait()`` or ``as_completed()``, while it held one of them, would
    wait for itself. Whoever holds one (this thread or another) lets go within a few
    bytecodes, so a short-lived thread that waits for it delivers the notice instead.
    """
    for lock in (waiter.event._cond._lock, getattr(waiter, "lock", None)):
        if lock is None:
            continue
        if not lock.acquire(False):
            break
        lock.release()
    else:
        waiter.add_cancelled(future)
        return
    notifier = Thread(target=waiter.add_cancelled, args=(future,), name="portal_pool-notify")
    notifier.daemon = True
    try:
        notifier.start()
    except RuntimeError:  # no new thread once the interpreter is exiting: tell it here
        waiter.add_cancelled(future)
