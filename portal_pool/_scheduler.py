"""Scheduling policies: small pure objects that pick a worker and never touch threads."""

from __future__ import annotations


class RoundRobin:
    """Hand work to the workers in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, worker_count: int) -> int:
        # Two threads may read the same counter and pick the same worker; that costs a
        # little fairness, never correctness, and a lock here would serialise submitters.
        index = self._next % worker_count
        self._next = index + 1
        return index
