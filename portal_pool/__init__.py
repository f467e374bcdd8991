"""A pool of worker threads, each running one event loop behind an anyio portal."""

from ._exceptions import BrokenPortalPool
from ._pool import PortalPool
from ._worker import Worker, current_worker

__version__ = "0.1.0"

__all__ = ["BrokenPortalPool", "PortalPool", "Worker", "current_worker"]
