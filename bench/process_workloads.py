"""Tasks that run in child processes: module-level, so a spawned or forkserver child can
import them by name, and light to import (anyio only where a task sleeps).

Each task comes as a coroutine function (PortalPool, aiomultiprocess) and as a plain
function (``ProcessPoolExecutor``, which cannot run coroutines).
"""

from __future__ import annotations

import time


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
