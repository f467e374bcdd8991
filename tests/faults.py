"""Fault injection shared by the tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from portal_pool import current_worker


def kill_current_loop() -> None:
    """Make the calling worker's event loop itself fail (not just the calling task)."""
    if current_worker()._backend == "trio":
        import trio

        def explode() -> None:
            raise RuntimeError("injected loop failure")

        # trio treats an exception in a run_sync_soon callback as fatal to the run.
        trio.lowlevel.current_trio_token().run_sync_soon(explode)
    else:
        import asyncio

        asyncio.get_running_loop().stop()  # run_until_complete then raises


class ConnectsOnce:
    """A ``worker_context`` whose resource connects once: every later entry fails, so a
    worker whose loop dies cannot restart. ``entries`` counts the attempts."""

    def __init__(self) -> None:
        self.entries = 0

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        self.entries += 1
        if self.entries > 1:
            raise ConnectionError("cannot reconnect")
        yield
