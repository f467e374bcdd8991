"""A pool of worker threads, each running one event loop behind an anyio portal."""

from ._exceptions import BrokenPortalPool
from ._pool import PortalPool
from ._scheduler import LeastLoaded, RoundRobin, Scheduler
from ._statistics import PoolStatistics, WorkerStatistics
from ._worker import Worker, current_worker

__version__ = "0.1.0"

__all__ = [
    "BrokenPortalPool",
    "LeastLoaded",
    "PoolStatistics",
    "PortalPool",
    "RoundRobin",
    "Scheduler",
    "Worker",
    "WorkerStatistics",
    "current_worker",
]
