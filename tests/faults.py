"""Fault injection shared by the tests."""

from __future__ import annotations

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
