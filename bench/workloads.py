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


async def asyncio_sleeper(_: object = None) -> None:
    """Sleep 0.1 s with asyncio itself (the seed pattern's own way)."""
    await asyncio.sleep(SLEEP_SECONDS)


async def hash_buffer(buffer: bytes) -> bytes:
    """SHA-256 of one buffer; hashlib releases the GIL for large inputs."""
    return hashlib.sha256(buffer).digest()
