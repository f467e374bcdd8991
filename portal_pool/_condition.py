"""A future's condition: the lock itself, with the waiting ``Future`` needs, and the
running of a cancel that a call re-entering a locked section handed over."""

from __future__ import annotations

from _thread import LockType, RLock, allocate_lock
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from threading import get_ident

from ._signals import wait_in_slices

# The C lock's own release, under the overrides below.
_release = RLock.release


class FutureCondition(RLock):  # type: ignore[misc]  # pyright: ignore[reportGeneralTypeIssues]
    """The part of ``threading.Condition`` that ``Future`` uses, in the lock itself.

    Same algorithm as the stdlib's: each waiter parks on a lock of its own, released by
    ``notify_all``; the waiting itself stays interruptible by Ctrl-C. One object rather
    than a condition holding a lock: at tens of thousands of futures in flight, each
    object is one more for every garbage collection to walk. Entering it is the C
    lock's own ``acquire``.

    It also runs the cancel that a call re-entering a section of its future left (see
    :meth:`TaskFuture.cancel`), as soon as the interrupted thread has let go of the lock.
    """

    # Class defaults: the instance's own dict is made only when one is set, which most
    # futures never need.
    _parked: deque[LockType] | None = None
    _handed_over: Callable[[], object] | None = None
    _running_hand_over = False

    def __exit__(self, *exc_info: object) -> None:
        _release(self)
        if self._handed_over is not None:
            self._run_handed_over()

    def release(self) -> None:
        _release(self)
        if self._handed_over is not None:
            self._run_handed_over()

    def _hand_over(self, call: Callable[[], object]) -> None:
        """Run ``call`` once the thread holding the lock (the caller's) lets go of it."""
        self._handed_over = call

    def _run_handed_over(self) -> None:
        # Not while an outer section of this thread still holds the lock, nor inside the
        # call itself (it takes the lock, and its release comes back here). The call
        # stays handed over until it has run: until then the promise holds, so the loop
        # thread, which can take the lock before the call does, neither starts nor
        # finishes the task (see TaskFuture._cancel_promised). One that lands while the
        # call runs leaves another: hence the loop.
        while (
            self._handed_over is not None and not self._running_hand_over and not self._is_owned()  # type: ignore[attr-defined]
        ):
            call = self._handed_over
            self._running_hand_over = True
            try:
                call()
            finally:
                self._running_hand_over = False
                if self._handed_over is call:
                    self._handed_over = None

    def wait(self, timeout: float | None = None) -> bool:
        waiter = allocate_lock()
        waiter.acquire()
        parked = self._parked
        if parked is None:
            parked = self._parked = deque()
        parked.append(waiter)
        # How to take the lock back, known before letting go of it: a Ctrl-C is raised as
        # _release_save() returns, before its value is stored, if it arrived meanwhile
        # (the free-threaded build shows it), and the finally must still restore the lock
        # for the caller's `with` to release. Python 3.10 has no _recursion_count: one
        # level, what Future.result() and exception() hold.
        count = getattr(self, "_recursion_count", lambda: 1)()
        saved = (count, get_ident())
        notified = False
        try:
            saved = self._release_save()  # type: ignore[attr-defined]
            # A cancel handed over by a call that interrupted the caller's check of the
            # state, before this wait: run now, it notifies the waiter parked above.
            if self._handed_over is not None:
                self._run_handed_over()
            if timeout is None:
                wait_in_slices(lambda seconds: bool(waiter.acquire(True, seconds)))
                notified = True
            elif timeout > 0:
                notified = bool(waiter.acquire(True, timeout))
            else:
                notified = bool(waiter.acquire(False))
            return notified
        finally:
            if not self._is_owned():  # type: ignore[attr-defined]  # (not if interrupted before)
                self._acquire_restore(saved)  # type: ignore[attr-defined]
            if not notified:
                # Timed out. If notify_all took this deque meanwhile, it is done with it
                # (it runs under the lock we just got back), so removing is harmless.
                with suppress(ValueError):
                    parked.remove(waiter)

    def notify_all(self) -> None:
        parked = self._parked
        if parked is not None:  # (not stored otherwise: see the class defaults)
            self._parked = None
            for waiter in parked:
                waiter.release()
