"""The benign races of docs/free-threading.md, each hammered under contention.

The pool reads a few values without a lock, where a stale or lost value costs accuracy,
never correctness: the round-robin counter, the load counters a scheduler sees, the
``stats()`` snapshot, the watchdog's ``loop_lag``, and the fast-path reads of the
shut-down and ``max_pending`` flags. Each test starts many threads at a barrier and checks
that the race stays benign: no exception, no lost wake-up (every future ends, every thread
returns), and no negative or drifting count once the pool has ended.

They run on every build. With the GIL the threads take turns; on a free-threaded build
with ``PYTHON_GIL=0`` they run at once, on every core, which is the real check.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any

import anyio
import pytest

from portal_pool import LeastLoaded, PortalPool, RoundRobin

from .conftest import gil_enabled

THREADS = 16
PER_THREAD = 200
TIMEOUT = 30.0  # every blocking wait in this file is bounded by this

MakePool = Callable[..., PortalPool[Any]]


def test_the_build_is_known() -> None:
    # Printed with -s (or -rA): which kind of run this was.
    print(f"\nfree-threaded run: {not gil_enabled()}")


def hammer(target: Callable[[int], object], threads: int = THREADS) -> None:
    """Run ``target(index)`` in ``threads`` threads released together; every thread must
    return, and none may raise."""
    barrier = threading.Barrier(threads)
    errors: list[str] = []

    def run(index: int) -> None:
        try:
            barrier.wait(TIMEOUT)
            target(index)
        except BaseException as exc:
            errors.append(f"thread {index}: {type(exc).__name__}: {exc}")
            barrier.abort()

    started = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(TIMEOUT)
    stuck = [thread.name for thread in started if thread.is_alive()]
    assert not stuck, f"threads never returned: {stuck}"
    assert not errors, errors


async def double(n: int) -> int:
    await anyio.sleep(0)  # one checkpoint: the task is running for a moment
    return 2 * n


def check_ended(pool: PortalPool[Any], futures: list[Future[Any]]) -> None:
    """Every future ended; the counts add up exactly, with nothing left over."""
    _, not_done = wait(futures, timeout=TIMEOUT)
    assert not not_done, f"{len(not_done)} futures never ended"
    pool.shutdown(wait=True)
    stats = pool.stats()
    cancelled = sum(future.cancelled() for future in futures)
    failed = sum(not future.cancelled() and future.exception(0) is not None for future in futures)
    assert (stats.running, stats.queued, stats.pending) == (0, 0, 0), stats
    assert (stats.completed, stats.failed, stats.cancelled) == (
        len(futures) - cancelled - failed,
        failed,
        cancelled,
    ), stats
    for worker in pool.workers:
        assert worker._submitted == worker._exited_count, worker
        assert worker._unfinished == 0, worker


# -- the round-robin counter ------------------------------------------------------------


def test_round_robin_choose_under_contention() -> None:
    """``RoundRobin.choose`` from many threads at once: always a valid index, and every
    worker keeps getting work (two threads may pick the same one: fairness, not safety)."""
    scheduler = RoundRobin()
    loads = [0, 0, 0]
    chosen: list[list[int]] = [[0, 0, 0] for _ in range(THREADS)]

    def choose(index: int) -> None:
        counts = chosen[index]
        for _ in range(50 * PER_THREAD):
            counts[scheduler.choose(loads)] += 1  # IndexError if it ever left the range

    hammer(choose)
    totals = [sum(counts[i] for counts in chosen) for i in range(3)]
    assert sum(totals) == THREADS * 50 * PER_THREAD
    assert min(totals) > 0, totals
    assert 1 <= scheduler._next <= 3


def test_round_robin_submits_under_contention(make_pool: MakePool) -> None:
    """The pool's inlined round robin, from many submitting threads: every task runs once,
    with its own result, and every worker gets some."""
    pool = make_pool(3)
    futures: list[list[Future[int]]] = [[] for _ in range(THREADS)]

    def submit(index: int) -> None:
        mine = futures[index]
        for n in range(PER_THREAD):
            mine.append(pool.submit(double, index * PER_THREAD + n))

    hammer(submit)
    flat = [future for mine in futures for future in mine]
    check_ended(pool, flat)
    assert [future.result() for future in flat] == [2 * n for n in range(len(flat))]
    assert all(worker.completed > 0 for worker in pool.stats().workers), pool.stats()
    assert 1 <= pool._next_index <= 3


# -- the load counters --------------------------------------------------------------------


class RecordingLeastLoaded(LeastLoaded):
    """LeastLoaded that keeps every load it read, to check each one."""

    def __init__(self) -> None:
        super().__init__(seed=7)
        self.seen: list[int] = []

    def choose(self, loads: Sequence[int]) -> int:
        self.seen.extend([loads[i] for i in range(len(loads))])  # one extend: atomic
        return super().choose(loads)


def test_load_counters_under_contention(make_pool: MakePool) -> None:
    """The loads a scheduler reads while many threads submit and the loops finish tasks:
    never negative nor more than was submitted, and all zero once the pool has ended."""
    scheduler = RecordingLeastLoaded()
    pool = make_pool(3, schedule=scheduler)
    futures: list[list[Future[int]]] = [[] for _ in range(THREADS)]

    def submit(index: int) -> None:
        mine = futures[index]
        for n in range(PER_THREAD):
            mine.append(pool.submit(double, n))

    hammer(submit)
    flat = [future for mine in futures for future in mine]
    check_ended(pool, flat)
    assert len(scheduler.seen) == 3 * len(flat)
    assert min(scheduler.seen) >= 0
    assert max(scheduler.seen) <= len(flat)
    assert list(pool._loads) == [0, 0, 0]


# -- the stats() snapshot -------------------------------------------------------------------


async def outcome(n: int) -> int:
    await anyio.sleep(0)
    if n % 7 == 0:
        raise ValueError(n)
    return n


def test_stats_snapshots_under_contention(make_pool: MakePool) -> None:
    """``stats()`` read over and over while many threads submit, cancel and the loops
    settle tasks: every figure is non-negative, the outcomes only ever grow as one thread
    sees them, and they never exceed what was submitted. Exact once the pool has ended."""
    pool = make_pool(3)
    submitters = THREADS - 4
    futures: list[list[Future[int]]] = [[] for _ in range(submitters)]
    finished: list[int] = []  # the submitters that are done

    def submit(index: int) -> None:
        mine = futures[index]
        for n in range(PER_THREAD):
            mine.append(pool.submit(outcome, n))
            if n % 5 == 0:
                mine[-1].cancel()
        finished.append(index)

    def read(index: int) -> None:
        last = [(0, 0, 0)] * len(pool.workers)
        reads = 0
        # Until every submitter is done, and at least a few hundred times.
        while reads < 300 or len(finished) < submitters:
            reads += 1
            stats = pool.stats()
            submitted = sum(worker._submitted for worker in pool.workers)  # read after
            for snapshot in (stats, *stats.workers):
                figures = (snapshot.running, snapshot.queued, snapshot.completed)
                assert min(*figures, snapshot.failed, snapshot.cancelled) >= 0, stats
            assert stats.pending == stats.running + stats.queued, stats
            assert stats.completed + stats.failed + stats.cancelled <= submitted, stats
            for position, worker in enumerate(stats.workers):
                now = (worker.completed, worker.failed, worker.cancelled)
                assert all(a <= b for a, b in zip(last[position], now, strict=True)), stats
                last[position] = now

    def run(index: int) -> None:
        if index < submitters:
            submit(index)
        else:
            read(index)

    hammer(run)
    flat = [future for mine in futures for future in mine]
    check_ended(pool, flat)
    assert pool.stats().cancelled >= submitters * math.ceil(PER_THREAD / 5) // 2


# -- the watchdog's loop_lag --------------------------------------------------------------

STALL_TIMEOUT = 0.2


def test_loop_lag_under_contention(make_pool: MakePool) -> None:
    """``loop_lag``, written by the watchdog and by the loop answering its ping, read by
    many threads while others keep the loops busy: always ``None`` or a finite figure
    >= 0; once the load is over, a fresh ping is answered and it falls back under the
    timeout (it does not stay stale)."""
    pool = make_pool(2, stall_timeout=STALL_TIMEOUT)
    submitters = THREADS - 4
    futures: list[list[Future[int]]] = [[] for _ in range(submitters)]
    finished: list[int] = []  # the submitters that are done
    readings: list[float] = []

    def submit(index: int) -> None:
        mine = futures[index]
        for n in range(PER_THREAD):
            mine.append(pool.submit(double, n))
        finished.append(index)

    def read(index: int) -> None:
        reads = 0
        while reads < 300 or len(finished) < submitters:
            reads += 1
            for worker in pool.stats().workers:
                lag = worker.loop_lag
                if lag is not None:
                    assert math.isfinite(lag), lag
                    assert lag >= 0, lag
                    readings.append(lag)

    answered_fresh_ping(pool)  # the watchdog is measuring before the load starts
    hammer(lambda index: submit(index) if index < submitters else read(index))
    assert readings
    answered_fresh_ping(pool)
    check_ended(pool, [future for mine in futures for future in mine])


def answered_fresh_ping(pool: PortalPool[Any]) -> None:
    """Wait until every worker's loop_lag is under the stall timeout: a ping cycle ends
    with the loop's answer, and an idle loop answers at once (a condition polled with a
    deadline: only the watchdog's thread and the loop can make it true)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        lags = [worker.loop_lag for worker in pool.stats().workers]
        if all(lag is not None and lag < STALL_TIMEOUT for lag in lags):
            return
        time.sleep(0.01)
    pytest.fail(f"loop_lag stayed at {lags}")


# -- the fast-path flag reads ---------------------------------------------------------------


@pytest.mark.parametrize("max_pending", [None, 2])
@pytest.mark.parametrize("cancel_futures", [False, True], ids=["wait", "cancel_futures"])
def test_submits_racing_shutdowns(
    make_pool: MakePool, max_pending: int | None, cancel_futures: bool
) -> None:
    """Many threads submit while two others shut the pool down, all released at once:
    ``submit`` reads the shut-down flag (and the ``max_pending`` count) without a lock,
    and the lock that decides reads them again. A submit either returns a future that
    ends (with its result, or cancelled by a cancelling shutdown) or raises
    ``RuntimeError``, and once one has raised in a thread, every later one does too. A
    submitter blocked on a full pool is woken by the shutdown, never left waiting."""
    pool = make_pool(2, max_pending=max_pending)
    submitters = THREADS - 2
    futures: list[list[tuple[int, Future[int]]]] = [[] for _ in range(submitters)]
    refused = [0] * submitters

    def submit(index: int) -> None:
        mine = futures[index]
        for n in range(PER_THREAD):
            try:
                future = pool.submit(double, n)
            except RuntimeError as exc:
                if "after shutdown" not in str(exc):
                    raise
                refused[index] += 1
                continue
            assert not refused[index], "a submit was accepted after one was refused"
            mine.append((n, future))

    def run(index: int) -> None:
        if index < submitters:
            submit(index)
        else:
            pool.shutdown(wait=True, cancel_futures=cancel_futures)

    hammer(run)
    accepted = [future for mine in futures for _, future in mine]
    check_ended(pool, accepted)
    for mine in futures:
        for n, future in mine:
            if not future.cancelled():
                assert future.result() == 2 * n
    if not cancel_futures:
        assert not any(future.cancelled() for future in accepted)
    assert sum(refused) + len(accepted) == submitters * PER_THREAD
    limit = pool._pending_limit
    if limit is not None:
        assert limit.count == 0
        assert not limit._parked
