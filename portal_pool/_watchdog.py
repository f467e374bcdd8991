"""The stall watchdog: notices a worker loop blocked by sync code, and shows where."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ._worker import Worker

logger = logging.getLogger("portal_pool")


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


class Heartbeat:
    """One worker's side of the watchdog, for a loop in this process.

    A ping is one callback scheduled in the loop: while the loop is healthy it costs one
    wake-up per interval and nothing on the submit path.
    """

    def __init__(self, worker: Worker[Any], call_soon: Callable[..., None]) -> None:
        self._worker = worker
        self._call_soon = call_soon
        # The ping in flight (its send time), and whether its stall was reported.
        self._sent: float | None = None
        self._reported = False

    @property
    def ping_in_flight(self) -> bool:
        return self._sent is not None

    def check(self, now: float, stall_timeout: float) -> None:
        """Ping the loop, or report a ping left unanswered for ``stall_timeout``."""
        sent = self._sent
        if sent is None:
            self._sent = now
            self._reported = False
            self._call_soon(self._answer, now)
            return
        worker = self._worker
        waited = now - sent
        worker._loop_lag = waited
        if waited < stall_timeout or self._reported:
            return
        self._reported = True  # once per stall, however long it lasts
        worker._stalls += 1
        frame = sys._current_frames().get(worker._thread_ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
        logger.warning(
            "worker %d's event loop has not responded for %.2f s (stall %d); "
            "something is blocking it. Its thread is at:\n%s",
            worker.index,
            waited,
            worker._stalls,
            stack,
        )

    def forget_ping(self) -> None:
        self._sent = None

    def _answer(self, sent: float) -> None:
        self._worker._loop_lag = time.monotonic() - sent
        self._sent = None
