"""A worker's counters: what ``stats()`` reports, kept exact under any interleaving."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from ._future import CANCELLED, CANCELLED_AND_NOTIFIED, TaskFuture
from ._statistics import WorkerStatistics

if TYPE_CHECKING:
    from ._flow import PendingLimit


class TaskCounts:
    """Mixed into :class:`~portal_pool.Worker`: task exits, outcomes, restarts and stalls.

    Submissions are counted under the worker's lock, exits under a lock of their own: the
    loop side settles every task, and sharing the inbox lock with the submitters would
    make the two sides contend once per item.
    """

    # The worker's, read here.
    _index: int
    _submitted: int
    _active: int
    _pending_limit: PendingLimit | None

    def _init_counts(self) -> None:
        # Reentrant only so that a task exit re-entering a section (a signal handler's
        # cancel, a __del__, ...) can tell, and hand its record over to the interrupted
        # thread instead of waiting for itself (see _record_exit).
        self._exit_lock = threading.RLock()
        self._exits_handed_over: deque[TaskFuture[Any]] = deque()
        self._exited_count = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._restarts = 0
        self._stalls = 0
        self._loop_lag: float | None = None

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
