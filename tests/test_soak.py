"""Soak: a million tasks through four workers with random cancellations.

Nothing may be lost (every future resolves, with its own result or cancelled, and the
pool's statistics account for each exactly once) and the process's resident memory must
stay flat once warmed up. Slow (a minute or two per backend), so it only runs when asked:

    PORTAL_POOL_SOAK=1 pytest tests/test_soak.py -q -s
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future, wait
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .conftest import requires_trio
from .helpers import FINISHED, cancel_and_classify

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("PORTAL_POOL_SOAK") != "1",
        reason="soak test: set PORTAL_POOL_SOAK=1 to run it",
    ),
    pytest.mark.timeout(1800),
]

TASKS = 1_000_000
WORKERS = 4
BATCH = 10_000  # submitted, then 1% cancelled, then waited for: bounded memory in flight
CANCEL_RATE = 0.01
WARM_UP = 100_000  # the RSS baseline is taken once this many tasks are through
RSS_GROWTH_LIMIT_MIB = 64
BATCH_TIMEOUT = 120.0  # seconds for one batch to resolve: generous, but bounded
MIB = 1024 * 1024


def proc_status_kib(field: str) -> int:
    """A ``kB`` figure from /proc/self/status, such as ``VmRSS`` or ``VmHWM``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise LookupError(field)


def rss_mib() -> float:
    gc.collect()
    return proc_status_kib("VmRSS") * 1024 / MIB


def cancel(future: Future[Any], tally: Counter[str]) -> bool:
    """Cancel ``future``; count the attempt under the state cancel() acted on."""
    state = cancel_and_classify(future)
    tally[state] += 1
    return state != FINISHED


async def work(n: int) -> int:
    await anyio.sleep(0)  # one checkpoint: a cancel may land while the task runs
    return n ^ 0x5A5A


@pytest.mark.parametrize("backend", ["asyncio", pytest.param("trio", marks=requires_trio)])
def test_a_million_tasks_lose_nothing_and_keep_rss_flat(backend: str) -> None:
    rng = random.Random(20240607)
    prefix = f"soak-{backend}"
    tally: Counter[str] = Counter()  # cancel attempts, by the state cancel() met
    lost = wrong = 0
    rss_warm: float | None = None
    started = time.perf_counter()
    pool: PortalPool[Any] = PortalPool(WORKERS, backend=backend, thread_name_prefix=prefix)
    try:
        for first in range(0, TASKS, BATCH):
            batch: list[Future[int]] = []
            chosen: set[int] = set()
            for n in range(first, first + BATCH):
                batch.append(pool.submit(work, n))
                # Half the cancellations at once, while the task is usually queued...
                if rng.random() < CANCEL_RATE / 2 and cancel(batch[-1], tally):
                    chosen.add(n - first)
            for position in rng.sample(range(BATCH), round(BATCH * CANCEL_RATE / 2)):
                # ... half once the batch is in: queued, running or already finished.
                if position not in chosen and cancel(batch[position], tally):
                    chosen.add(position)
            _, not_done = wait(batch, timeout=BATCH_TIMEOUT)
            lost += len(not_done)
            for position, future in enumerate(batch):
                if not future.done():
                    continue
                if future.cancelled():
                    wrong += position not in chosen  # cancelled by nobody
                elif future.result() != (first + position) ^ 0x5A5A:
                    wrong += 1
            del batch, future, not_done
            if first + BATCH == WARM_UP:
                rss_warm = rss_mib()
        elapsed = time.perf_counter() - started
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    attempts = sum(tally.values())
    cancelled = tally["PENDING"] + tally["RUNNING"]
    too_late = tally["FINISHED"]
    rss_end = rss_mib()
    peak = proc_status_kib("VmHWM") * 1024 / MIB
    stats = pool.stats()
    assert rss_warm is not None
    growth = rss_end - rss_warm
    print(
        f"\nsoak[{backend}]: tasks={TASKS:,} workers={WORKERS} batch={BATCH:,} "
        f"cancel attempts={attempts:,} (cancelled while queued={tally['PENDING']:,}, "
        f"while running={tally['RUNNING']:,}, too late={too_late:,}) "
        f"lost={lost} wrong outcome={wrong}\n"
        f"soak[{backend}]: stats completed={stats.completed:,} cancelled={stats.cancelled:,} "
        f"failed={stats.failed} completed+cancelled={stats.completed + stats.cancelled:,}\n"
        f"soak[{backend}]: RSS after {WARM_UP:,} tasks={rss_warm:.1f} MiB, at end="
        f"{rss_end:.1f} MiB, growth={growth:+.1f} MiB (limit {RSS_GROWTH_LIMIT_MIB}), "
        f"process peak so far (VmHWM)={peak:.1f} MiB\n"
        f"soak[{backend}]: elapsed={elapsed:.1f} s ({TASKS / elapsed:,.0f} tasks/s)"
    )
    assert lost == 0
    assert wrong == 0
    assert attempts == cancelled + too_late  # no future was cancelled twice
    assert stats.failed == 0
    assert stats.cancelled == cancelled
    assert stats.completed + stats.cancelled == TASKS
    assert (stats.running, stats.queued) == (0, 0)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(prefix)]
    assert growth < RSS_GROWTH_LIMIT_MIB
