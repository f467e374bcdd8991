"""A pool of workers, each running one event loop behind an anyio portal, in a thread or
a child process."""

from ._exceptions import BrokenPortalPool
from ._pool import PortalPool
from ._process_host import ProcessHost
from ._scheduler import LeastLoaded, RoundRobin, Scheduler
from ._statistics import PoolStatistics, WorkerStatistics
from ._thread_host import ThreadHost
from ._worker import Worker, current_worker

__version__ = "0.1.0"

__all__ = [
    "BrokenPortalPool",
    "LeastLoaded",
    "PoolStatistics",
    "PortalPool",
    "ProcessHost",
    "RoundRobin",
    "Scheduler",
    "ThreadHost",
    "Worker",
    "WorkerStatistics",
    "current_worker",
]
