"""The stall watchdog: notices a worker loop blocked by sync code, and shows where."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from ._worker import Worker


class StallWatchdog:
    """One daemon thread that pings every worker's loop and reports unanswered pings.

    A ping is one callback scheduled in the loop; while the loop is healthy it costs one
    wake-up per worker per interval and nothing on the submit path. A loop that does not
    answer within ``stall_timeout`` is reported once per stall, with its thread's stack.
    """

    def __init__(self, workers: Sequence[Worker[Any]], stall_timeout: float, name: str) -> None:
        self._workers = tuple(workers)
        self._stall_timeout = stall_timeout
        # Four checks per timeout: a stall is reported at most a quarter late.
        self._interval = min(stall_timeout / 4, 1.0)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool) -> None:
        self._stopping.set()
        if (
            wait
            and self._thread.ident is not None
            and self._thread is not threading.current_thread()
        ):
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopping.wait(self._interval):
            now = time.monotonic()
            for worker in self._workers:
                worker._check_heartbeat(now, self._stall_timeout)
