"""Backpressure: a pool-wide cap on unfinished tasks, awaitable from sync and async code."""

from __future__ import annotations

import threading
from collections import deque

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

    Sync callers wait on a condition; async callers (asyncio or trio) park an event that
    the releasing thread sets through the caller's own event-loop token, so waiting for
    room never blocks a caller's loop. Closing wakes everyone with an error.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._closed = False
        self._forked = False  # a copy in a child made by os.fork(): closed for good
        # The plain lock serves the fast paths; the condition over it only blocked
        # submitters, counted so release() skips notify() when nobody waits.
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._blocked = 0
        # Async waiters, oldest first; a deque so release() can hand room out in order.
        self._async_waiters: deque[tuple[EventLoopToken, anyio.Event]] = deque()

    @property
    def count(self) -> int:
        return self._count

    def acquire(self) -> None:
        """Block until there is room.

        :raises RuntimeError: once the pool is shut down
        """
        with self._lock:
            if self._count < self.limit and not self._closed:
                self._count += 1
                return
            self._blocked += 1
            try:
                while self._count >= self.limit and not self._closed:
                    self._condition.wait(SIGNAL_CHECK_INTERVAL)  # see _signals
            finally:
                self._blocked -= 1
            if self._closed:
                raise self._refusal()
            self._count += 1

    def would_block(self) -> bool:
        return self._count >= self.limit

    async def acquire_async(self) -> None:
        """Wait for room without blocking the caller's event loop.

        :raises RuntimeError: once the pool is shut down
        """
        while True:
            with self._lock:
                if self._closed:
                    raise self._refusal()
                if self._count < self.limit:
                    self._count += 1
                    return
                waiter = (current_token(), anyio.Event())
                self._async_waiters.append(waiter)
            try:
                await waiter[1].wait()
            except BaseException:
                with self._lock:
                    if waiter in self._async_waiters:
                        self._async_waiters.remove(waiter)
                    else:
                        self._wake_one_async()  # we were handed room we won't use
                raise

    def release(self) -> None:
        with self._lock:
            self._count -= 1
            if self._blocked:
                self._condition.notify()
            if self._async_waiters:
                self._wake_one_async()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._condition.notify_all()
            waiters, self._async_waiters = self._async_waiters, deque()
        for token, event in waiters:
            call_soon_or_drop(token, event.set)

    def _after_fork_in_child(self) -> None:
        """In a child made by ``os.fork()``: new locks (their holders are gone), closed."""
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._blocked = 0
        self._async_waiters.clear()
        self._closed = True
        self._forked = True

    def _refusal(self) -> Exception:
        return BrokenPortalPool(FORK_MESSAGE) if self._forked else RuntimeError(SHUTDOWN_MESSAGE)

    def _wake_one_async(self) -> None:
        # Called with the lock held. A woken waiter re-checks the count, so waking
        # one per release is enough and never loses room.
        if self._async_waiters:
            token, event = self._async_waiters.popleft()
            call_soon_or_drop(token, event.set)
