"""When a worker whose loop died is restarted, and when it is broken instead.

A small pure policy: it never touches a thread or a process, so every host shares it and
a test can drive it with a fake clock.
"""

from __future__ import annotations

import time
from collections import deque

# A worker whose loop fails again after this many restarts within this many seconds is
# broken rather than restarted: its failure comes back as soon as it starts.
RESTART_BURST = 5
RESTART_WINDOW = 1.0


class RestartPolicy:
    """Decides, after each failure of one worker's loop, whether to start another."""

    def __init__(self) -> None:
        self._restarts: deque[float] = deque(maxlen=RESTART_BURST)  # their times

    def gives_up(self, accepted: bool) -> str | None:
        """Why the worker is broken after this failure, or ``None`` to restart it.

        :param accepted: whether the loop that failed had started serving work; a
            replacement that could not even start is not tried again
        """
        now = time.monotonic()
        if not accepted:
            return "failed and its replacement could not start"
        if len(self._restarts) == RESTART_BURST and now - self._restarts[0] < RESTART_WINDOW:
            return f"failed again after {RESTART_BURST} restarts in {RESTART_WINDOW:g} s"
        self._restarts.append(now)
        return None

    @property
    def restarted(self) -> bool:
        """Whether any loop of this worker was restarted."""
        return bool(self._restarts)
