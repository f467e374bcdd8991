"""Exceptions raised by portal_pool, and the safe text their messages are built from."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

__all__ = ["BrokenPortalPool"]


class BrokenPortalPool(BrokenExecutor):
    """A worker's event loop could not start, or died while it held work.

    Futures that were queued on or running in such a worker end with this error instead
    of staying pending forever.
    """


def safe_repr(value: object) -> str:
    """``repr(value)`` for an error message, or a placeholder if that ``repr`` fails.

    Messages name the caller's objects (a bad argument, the exception a worker_context
    raised). Building one must not fail, or the caller would see the broken ``__repr__``'s
    error instead of the one that explains the problem.
    """
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object, whose repr() failed>"
