"""Read-only snapshots of the pool's state, in anyio's statistics style."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolStatistics", "WorkerStatistics"]


@dataclass(frozen=True)
class WorkerStatistics:
    """One worker, at the moment :meth:`PortalPool.stats` was called.

    :ivar index: the worker's position in ``pool.workers``
    :ivar running: tasks started and not yet finished
    :ivar queued: tasks submitted and not started yet (inbox, or held by max_concurrency)
    :ivar completed: tasks that returned a value
    :ivar failed: tasks that raised (including those ended by a dead loop)
    :ivar cancelled: tasks cancelled, before or while running
    :ivar restarts: times the worker's event loop died and was replaced
    :ivar stalls: times the stall watchdog found the loop unresponsive
    :ivar loop_lag: seconds the loop took to answer the watchdog's last ping, or how long
        the current ping has waited; ``None`` without ``stall_timeout``
    """

    index: int
    running: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    restarts: int
    stalls: int
    loop_lag: float | None


@dataclass(frozen=True)
class PoolStatistics:
    """Totals over every worker, and the per-worker snapshots they come from."""

    workers: tuple[WorkerStatistics, ...]
    running: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    restarts: int
    stalls: int
    #: tasks submitted and not yet finished, the figure ``max_pending`` limits
    pending: int
