"""Tasks that run in child processes: module-level, so a spawned or forkserver child can
import them by name, and light to import (anyio only where a task sleeps).

Each task comes as a coroutine function (PortalPool, aiomultiprocess) and as a plain
function (``ProcessPoolExecutor``, which cannot run coroutines).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _spin(iterations: int) -> int:
    """Pure-Python work that holds the GIL throughout: no C call releases it."""
    total = 0
    for index in range(iterations):
        total += index * index % 7
    return total


async def noop(_: object = None) -> None:
    """Do nothing (one optional argument, for ``map``)."""


def noop_sync(_: object = None) -> None:
    """Do nothing, as a plain function."""


async def spin(iterations: int) -> int:
    """A coroutine that computes without ever awaiting."""
    return _spin(iterations)


def spin_sync(iterations: int) -> int:
    """The same computation as a plain function."""
    return _spin(iterations)


def iterations_per_second() -> float:
    """How many :func:`_spin` iterations this process does per second (best of 3)."""
    sample = 100_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _spin(sample)
        best = min(best, time.perf_counter() - start)
    return sample / best


# -- marked tasks, for bench.failures ----------------------------------------------------
#
# ``start-<tag>-<pid>`` is created when the task starts; ``end-<tag>-<how>`` in its
# ``finally``, where ``how`` is ``finished`` if the sleep ran to its end and ``interrupted``
# otherwise (cancelled, KeyboardInterrupt, ...). A task killed outright leaves no end file.


def _started(directory: str, tag: str) -> None:
    (Path(directory) / f"start-{tag}-{os.getpid()}").touch()


def _ended(directory: str, tag: str, finished: bool) -> None:
    how = "finished" if finished else "interrupted"
    (Path(directory) / f"end-{tag}-{how}").touch()


async def marked_sleep(directory: str, tag: str, seconds: float) -> str:
    """Sleep through anyio (asyncio or trio), leaving start and end marker files."""
    import anyio

    _started(directory, tag)
    finished = False
    try:
        await anyio.sleep(seconds)
        finished = True
        return tag
    finally:
        _ended(directory, tag, finished)


def marked_sleep_sync(directory: str, tag: str, seconds: float) -> str:
    """The same with ``time.sleep``, for ``ProcessPoolExecutor``."""
    _started(directory, tag)
    finished = False
    try:
        time.sleep(seconds)
        finished = True
        return tag
    finally:
        _ended(directory, tag, finished)
