"""Exceptions raised by portal_pool."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

__all__ = ["BrokenPortalPool"]


class BrokenPortalPool(BrokenExecutor):
    """A worker's event loop could not start, or died while it held work.

    Futures that were queued on or running in such a worker end with this error instead
    of staying pending forever.
    """
