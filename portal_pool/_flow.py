"""Backpressure: a pool-wide cap on unfinished tasks, awaitable from sync and async code."""

from __future__ import annotations

import threading
from _thread import LockType, allocate_lock
from collections import deque
from contextlib import suppress

import anyio
from anyio.lowlevel import EventLoopToken, current_token

from ._exceptions import BrokenPortalPool
from ._signals import SIGNAL_CHECK_INTERVAL
from ._tokens import call_soon_or_drop

SHUTDOWN_MESSAGE = "cannot schedule new futures after shutdown"
FORK_MESSAGE = (
    "this pool was inherited across os.fork(): its event loops run only in the parent "
    "process. Create a new PortalPool in the child, or start child processes with the "
    "'spawn' or 'forkserver' method"
)


class PendingLimit:
    """Counts unfinished tasks; admitting one more waits while ``limit`` are unfinished.

    Sync callers park a lock of their own that a release lets go of (as
    ``threading.Condition`` does); async callers (asyncio or trio) park an event that
    the releasing thread sets through the caller's own event-loop token, so waiting for
    room never blocks a caller's loop. Closing wakes everyone with an error.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._closed = False
        self._forked = False  # a copy in a child made by os.fork(): closed for good
        # Reentrant only so that a call re-entering a section in the thread that holds
        # it (a signal handler, __del__ or weakref callback, which Python may run between
        # any two bytecodes) can tell, with the lock's owner check, and hand its change
        # over instead of waiting for itself.
        self._lock = threading.RLock()
        # Blocked sync submitters, oldest first: each waits on a lock of its own.
        self._parked: deque[LockType] = deque()
        # Async waiters, oldest first; a deque so release() can hand room out in order.
        self._async_waiters: deque[tuple[EventLoopToken, anyio.Event]] = deque()
        # Changes handed over by re-entering calls: +1 (admitted), -1 (released), 0
        # (closed). The interrupted thread applies them once it has left its section:
        # applied in the middle of it, they could be overwritten by the rest of it.
        self._handed_over: deque[int] = deque()

    @property
    def count(self) -> int:
        return self._count

    def acquire(self) -> None:
        """Block until there is room.

        :raises RuntimeError: once the pool is shut down
        """
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._acquire_reentered()
            return
        try:
            with self._lock:
                if self._count < self.limit and not self._closed:
                    self._count += 1
                    return
                while True:
                    # Room released by a call that interrupted this very loop.
                    self._apply_handed_over()
                    if self._count < self.limit or self._closed:
                        break
                    self._wait()
                if self._closed:
                    raise self._refusal()
                self._count += 1
        finally:
            if self._handed_over:
                self._settle_handed_over()

    def _wait(self) -> None:
        """Wait for a release or a close, at most one slice (see _signals); lock held."""
        waiter = allocate_lock()
        waiter.acquire()
        self._parked.append(waiter)
        try:
            # Inside the try: a Ctrl-C raised as release() returns (where Python runs a
            # signal handler that arrived meanwhile) must still find the lock taken back
            # for the caller's `with` to release.
            self._lock.release()
            # A change handed over by a call that landed since the loop's check, the
            # lock still held, is applied at once: no wait for it.
            if not self._handed_over:
                waiter.acquire(True, SIGNAL_CHECK_INTERVAL)
        finally:
            # Held once on entry (acquire() takes the reentrant path otherwise): owned
            # here only if interrupted before the release.
            if not self._lock._is_owned():  # type: ignore[attr-defined]
                self._lock.acquire()
            with suppress(ValueError):  # not woken: still parked
                self._parked.remove(waiter)

    def _acquire_reentered(self) -> None:
        # Waiting for room here would wait for the section this call interrupted, which
        # cannot end before it returns: admit at once, even past the limit.
        if self._closed:
            raise self._refusal()
        self._handed_over.append(1)

    def would_block(self) -> bool:
        return self._count >= self.limit

    async def acquire_async(self) -> None:
        """Wait for room without blocking the caller's event loop.

        :raises RuntimeError: once the pool is shut down
        """
        while True:
            waiter = self._admit_or_park()
            if waiter is None:
                return
            try:
                await waiter[1].wait()
            except BaseException:
                self._unpark(waiter)
                raise

    def _admit_or_park(self) -> tuple[EventLoopToken, anyio.Event] | None:
        """Take room, or park an event that a release will set; ``None`` if admitted."""
        try:
            with self._lock:
                if self._closed:
                    raise self._refusal()
                if self._count < self.limit:
                    self._count += 1
                    return None
                waiter = (current_token(), anyio.Event())
                self._async_waiters.append(waiter)
                return waiter
        finally:
            if self._handed_over:
                self._settle_handed_over()

    def _unpark(self, waiter: tuple[EventLoopToken, anyio.Event]) -> None:
        try:
            with self._lock:
                if waiter in self._async_waiters:
                    self._async_waiters.remove(waiter)
                else:
                    self._wake_one_async()  # we were handed room we won't use
        finally:
            if self._handed_over:
                self._settle_handed_over()

    def release(self) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._handed_over.append(-1)  # see _handed_over
            return
        with self._lock:
            self._count -= 1
            self._wake_one()
        if self._handed_over:
            self._settle_handed_over()

    def close(self) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._closed = True  # refused from now on; the waiters wake after the section
            self._handed_over.append(0)
            return
        with self._lock:
            self._closed = True
            self._wake_all()
        if self._handed_over:
            self._settle_handed_over()

    def _settle_handed_over(self) -> None:
        # Not while an outer section of this thread still holds the lock: that section
        # settles them when it leaves. A call that lands between the last check and the
        # lock's release hands over one more change: hence the loop.
        while self._handed_over and not self._lock._is_owned():  # type: ignore[attr-defined]
            with self._lock:
                self._apply_handed_over()

    def _apply_handed_over(self) -> None:
        # Called with the lock held. A call re-entering this only appends to the deque.
        handed_over = self._handed_over
        while handed_over:
            change = handed_over.popleft()
            self._count += change
            if change < 0:
                self._wake_one()
            elif change == 0:
                self._wake_all()

    def _wake_one(self) -> None:
        # Called with the lock held, after room was released. A woken waiter re-checks
        # the count, so waking one per release is enough and never loses room.
        if self._parked:
            self._parked.popleft().release()
        if self._async_waiters:
            self._wake_one_async()

    def _wake_all(self) -> None:
        # Called with the lock held, once closed: every waiter wakes to an error.
        parked, self._parked = self._parked, deque()
        for waiter in parked:
            waiter.release()
        waiters, self._async_waiters = self._async_waiters, deque()
        for token, event in waiters:
            call_soon_or_drop(token, event.set)

    def _wake_one_async(self) -> None:
        # Called with the lock held.
        if self._async_waiters:
            token, event = self._async_waiters.popleft()
            call_soon_or_drop(token, event.set)

    def _refusal(self) -> Exception:
        return BrokenPortalPool(FORK_MESSAGE) if self._forked else RuntimeError(SHUTDOWN_MESSAGE)

    def _after_fork_in_child(self) -> None:
        """In a child made by ``os.fork()``: a new lock (its holder is gone), closed."""
        self._lock = threading.RLock()
        self._parked.clear()
        self._handed_over.clear()
        self._async_waiters.clear()
        self._closed = True
        self._forked = True
