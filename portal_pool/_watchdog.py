"""The stall watchdog: notices a worker loop blocked by sync code, and shows where."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._worker import Worker


class StallWatchdog:
    """One daemon thread that pings every worker's loop and reports unanswered pings.

    A ping is one callback scheduled in the loop; while the loop is healthy it costs one
    wake-up per worker per interval and nothing on the submit path. A loop that does not
    answer within ``stall_timeout`` is reported once per stall, with its thread's stack.
    """

    def __init__(
        self,
        workers: Sequence[Worker[Any]],
        stall_timeout: float,
        name: str,
        after_check: Callable[[], object] | None = None,
    ) -> None:
        self._workers = tuple(workers)
        # Called after each round of checks (a worker process sends the parent its
        # loop_lag and stall count then).
        self._after_check = after_check
        self._stall_timeout = stall_timeout
        # Four checks per timeout: a stall is reported at most a quarter late.
        self._interval = min(stall_timeout / 4, 1.0)
        # Not a threading.Event: its set() takes a plain lock, and stop() called again
        # by a signal handler landing inside that set() (via shutdown) would deadlock.
        # SimpleQueue.put is reentrant.
        self._stopping: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool) -> None:
        self._stopping.put(None)
        if (
            wait
            and self._thread.ident is not None
            and self._thread is not threading.current_thread()
        ):
            self._thread.join()

    def _watch(self) -> None:
        while True:
            try:
                self._stopping.get(timeout=self._interval)
            except queue.Empty:
                now = time.monotonic()
                for worker in self._workers:
                    worker._host_loop.check_heartbeat(now, self._stall_timeout)
                if self._after_check is not None:
                    self._after_check()
            else:
                return
