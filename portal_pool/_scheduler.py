"""Scheduling policies: small pure objects that pick a worker and never touch threads."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._exceptions import safe_repr

if TYPE_CHECKING:
    from ._worker import Worker

__all__ = ["LeastLoaded", "RoundRobin", "Scheduler"]


@runtime_checkable
class Scheduler(Protocol):
    """Chooses the worker for each new task.

    ``loads[i]`` is the number of unfinished tasks (queued or running) of worker ``i``.
    It is a live view: read only the entries you need, since each read is a lookup. A
    policy must return an index in ``range(len(loads))`` and must not block.
    """

    def choose(self, loads: Sequence[int]) -> int:
        """Return the index of the worker that gets the next task."""
        ...


class RoundRobin:
    """Hand work to the workers in turn; ignores the loads."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Sequence[int]) -> int:
        # Two threads may read the same counter and pick the same worker; that costs a
        # little fairness, never correctness, and a lock here would serialise submitters.
        index = self._next % len(loads)
        self._next = index + 1
        return index


class LeastLoaded:
    """Power of two choices: sample two workers, take the less loaded one.

    Nearly as good as scanning every worker, at a constant cost per task, and it avoids
    the herd effect of always picking the single least loaded worker.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, loads: Sequence[int]) -> int:
        count = len(loads)
        if count == 1:
            return 0
        first = self._random.randrange(count)
        second = self._random.randrange(count - 1)
        if second >= first:
            second += 1  # two distinct workers
        return first if loads[first] <= loads[second] else second


def make_scheduler(schedule: str | Scheduler) -> Scheduler:
    """Resolve the ``schedule`` argument of :class:`~portal_pool.PortalPool`.

    :raises ValueError: for an unknown policy name
    :raises TypeError: for an object without a ``choose(loads)`` method
    """
    if schedule == "round_robin":
        return RoundRobin()
    if schedule == "least_loaded":
        return LeastLoaded()
    if isinstance(schedule, str):
        raise ValueError(
            f"unknown schedule {schedule!r}; use 'round_robin', 'least_loaded' or an object "
            "with a choose(loads) method"
        )
    if isinstance(schedule, type) or not isinstance(schedule, Scheduler):
        hint = " (pass an instance, e.g. LeastLoaded())" if isinstance(schedule, type) else ""
        raise TypeError(
            f"schedule must be 'round_robin', 'least_loaded' or a Scheduler with a "
            f"choose(loads) method, got {safe_repr(schedule)}{hint}"
        )
    return schedule


class Loads(Sequence[int]):
    """What a scheduler sees: each worker's unfinished task count, read on demand."""

    __slots__ = ("_workers",)

    def __init__(self, workers: tuple[Worker[Any], ...]) -> None:
        self._workers = workers

    def __len__(self) -> int:
        return len(self._workers)

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        return self._workers[index]._unfinished
