"""The tasks every contender runs: coroutine functions that work on asyncio and trio."""

from __future__ import annotations

import asyncio
import hashlib

import anyio

SLEEP_SECONDS = 0.1


async def noop(_: object = None) -> None:
    """Do nothing; runs unchanged on asyncio and trio (one argument for ``map``)."""


async def anyio_sleeper(_: object = None) -> None:
    """Sleep 0.1 s through anyio, so the same function runs on either backend."""
    await anyio.sleep(SLEEP_SECONDS)


async def trio_sleeper(_: object = None) -> None:
    """Sleep 0.1 s with trio itself, as a trio program would."""
    import trio

    await trio.sleep(SLEEP_SECONDS)


def bare_loops_sleepers(backend: str, loops: int, count: int) -> float:
    """The floor: ``count`` sleepers split over ``loops`` threads, each running its own
    event loop with no pool and no cross-thread hand-off; return the wall time."""
    import threading
    import time

    share = count // loops

    async def asyncio_main() -> None:
        await asyncio.gather(*(asyncio_sleeper() for _ in range(share)))

    async def trio_main() -> None:
        import trio

        async with trio.open_nursery() as nursery:
            for _ in range(share):
                nursery.start_soon(trio_sleeper)

    def run_one() -> None:
        if backend == "trio":
            import trio

            trio.run(trio_main)
        elif backend == "uvloop":
            import uvloop

            uvloop.run(asyncio_main())
        else:
            asyncio.run(asyncio_main())

    threads = [threading.Thread(target=run_one) for _ in range(loops)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


async def asyncio_sleeper(_: object = None) -> None:
    """Sleep 0.1 s with asyncio itself (the seed pattern's own way)."""
    await asyncio.sleep(SLEEP_SECONDS)


async def hash_buffer(buffer: bytes) -> bytes:
    """SHA-256 of one buffer; hashlib releases the GIL for large inputs."""
    return hashlib.sha256(buffer).digest()
