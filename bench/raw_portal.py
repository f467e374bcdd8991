"""Raw anyio blocking portals, one per thread, fed round robin with ``start_task_soon``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import ExitStack
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")


class RawPortals:
    """``workers`` portals from ``anyio.from_thread.start_blocking_portal``."""

    def __init__(
        self,
        workers: int = 2,
        backend: str = "asyncio",
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        self._stack = ExitStack()
        try:
            self._portals: list[BlockingPortal] = [
                self._stack.enter_context(
                    start_blocking_portal(backend, backend_options, name=f"raw-portal-{index}")
                )
                for index in range(workers)
            ]
        except BaseException:
            self._stack.close()
            raise
        self._next = 0

    def _portal(self) -> BlockingPortal:
        portal = self._portals[self._next]
        self._next = (self._next + 1) % len(self._portals)
        return portal

    def submit(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> Future[T]:
        """``portal.start_task_soon(fn, *args)`` on the next portal (a blocking round trip)."""
        return self._portal().start_task_soon(fn, *args)

    def run(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        """``portal.call(fn, *args)`` on the next portal."""
        return self._portal().call(fn, *args)

    def shutdown(self) -> None:
        """Stop every portal and join its thread."""
        self._stack.close()
