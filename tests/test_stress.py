"""Stress: 16 submitter threads on one pool, with random cancels, ``map`` windows,
``max_pending``, ``run`` and ``shutdown`` from several threads at once.

Written for the free-threaded build, where the submitters, the loops and the shutdowns run
at the same time on different cores; it runs on every build and backend (thread host).
Each thread draws its choices from a ``random.Random`` of its own, seeded from the round's
seed, so the choices of a failing round can be replayed; the interleaving is the machine's.
Nothing sleeps: the threads meet at barriers. The checks are about what no interleaving may
change:

- every submitter thread ends: none is left blocked on a full pool (a lost wake-up);
- no exception but the expected ones: a task's own ``ValueError``, ``RuntimeError`` once a
  shutdown has begun (and then for every later submit of that thread), ``CancelledError``
  from a map or ``run`` once a cancelling shutdown has begun;
- every future ends, with its own result or error, or cancelled, and only if a thread
  cancelled it or a cancelling shutdown did; a task cancelled while queued never starts;
- ``stats()`` counts each future once, as it ended, with nothing running or queued; the
  ``max_pending`` count is back at 0 and each worker's submitted and exited counts agree.

``PORTAL_POOL_STRESS_ROUNDS=N`` runs N seeds per case instead of 1 (the default run takes a
few seconds).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, wait
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

from .helpers import FINISHED, PENDING, cancel_and_classify

SUBMITTERS = 16
#: of the submitters, how many call shutdown at the same moment
SHUTTERS = 4
STEPS = 120  # operations per submitter per round
ROUNDS = int(os.environ.get("PORTAL_POOL_STRESS_ROUNDS", "1"))
BASE_SEED = 20261207
TIMEOUT = 30.0  # every blocking wait in this file is bounded by this
SHUTDOWN_MESSAGE = "after shutdown"

pytestmark = pytest.mark.timeout(60 + 30 * ROUNDS)


def expected(task_id: int) -> int:
    return task_id * 3 + 1


async def task(started: set[int], task_id: int, fail: bool) -> int:
    started.add(task_id)  # one set.add: atomic on every build
    if fail:
        raise ValueError(task_id)
    await anyio.sleep(0)  # one checkpoint: a cancel may land while it runs
    return expected(task_id)


def sync_task(started: set[int], task_id: int) -> int:
    started.add(task_id)
    return expected(task_id)


class RecordingPool(PortalPool[None]):
    """Keeps every future its ``submit`` makes: those of map and run too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.futures: list[Future[Any]] = []
        super().__init__(*args, **kwargs)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)  # one list.append: atomic on every build
        return future


@dataclass
class Round:
    """What the submitters of one round share."""

    seed: int
    pool: RecordingPool
    shut_down_mid_way: bool
    cancel_futures: bool
    started: set[int] = field(default_factory=set)
    ids: Any = field(default_factory=itertools.count)
    #: direct submits, as (future, task id, fails): the ones the threads cancel at random
    submitted: list[tuple[Future[Any], int, bool]] = field(default_factory=list)
    #: futures made by Worker.submit (the pool's list does not see them)
    pinned: list[Future[Any]] = field(default_factory=list)
    #: futures whose cancel() a thread called and which were then cancelled
    cancelled_by_threads: list[Future[Any]] = field(default_factory=list)
    #: ids of tasks cancelled while still queued: they must never start
    never_start: list[int] = field(default_factory=list)
    shutdown_begun: threading.Event = field(default_factory=threading.Event)
    start: threading.Barrier = field(default_factory=lambda: threading.Barrier(SUBMITTERS))
    half_way: threading.Barrier = field(default_factory=lambda: threading.Barrier(SUBMITTERS))
    errors: list[str] = field(default_factory=list)


class Submitter:
    """One thread's operations, each drawn at random."""

    def __init__(self, shared: Round, index: int) -> None:
        self.shared = shared
        self.index = index
        self.rng = random.Random(shared.seed * 100 + index)
        # Where a submit was refused: "pool", or a worker's index for Worker.submit. A
        # refused entry refuses every later submit; after any refusal the pool's own
        # entries do too (the pool is shut down before its workers close, one by one,
        # so a worker not closed yet may still take a call of its own: it then runs, or
        # is cancelled with the rest).
        self.refused: set[object] = set()

    def run(self) -> None:
        shared = self.shared
        try:
            shared.start.wait(TIMEOUT)
            for step in range(STEPS):
                if step == STEPS // 2 and shared.shut_down_mid_way:
                    shared.half_way.wait(TIMEOUT)
                    if self.index < SHUTTERS:
                        self.shut_down()
                        return
                self.step()
            if not shared.shut_down_mid_way:
                shared.half_way.wait(TIMEOUT)  # every submitter is done: shut down now
                if self.index < SHUTTERS:
                    self.shut_down()
                else:
                    self.submit()  # racing the shutdown
        except BaseException as exc:
            shared.errors.append(f"submitter {self.index}: {type(exc).__name__}: {exc}")
            # Nobody waits for a thread that has failed.
            shared.start.abort()
            shared.half_way.abort()

    def shut_down(self) -> None:
        self.shared.shutdown_begun.set()
        self.shared.pool.shutdown(wait=True, cancel_futures=self.shared.cancel_futures)

    def step(self) -> None:
        choice = self.rng.random()
        if choice < 0.55:
            self.submit()
        elif choice < 0.75:
            self.cancel()
        elif choice < 0.85:
            self.map()
        elif choice < 0.93:
            self.run_one()
        else:
            self.check_stats()

    def refusal(self, exc: RuntimeError, entry: object = "pool") -> None:
        """A RuntimeError from submitting: only ever after a shutdown began."""
        if SHUTDOWN_MESSAGE not in str(exc) or not self.shared.shutdown_begun.is_set():
            raise exc
        self.refused.add(entry)

    def accepted(self, what: str, entry: object = "pool") -> None:
        if entry in self.refused or (entry == "pool" and self.refused):
            raise AssertionError(f"{what} accepted after an earlier submit was refused")

    def submit(self) -> None:
        shared, rng = self.shared, self.rng
        task_id = next(shared.ids)  # itertools.count: atomic on every build
        kind = rng.choice(("ok", "ok", "fail", "sync"))
        workers = shared.pool.workers
        pin = rng.random() < 0.2
        entry: object = rng.randrange(len(workers)) if pin else "pool"
        submit = workers[entry].submit if isinstance(entry, int) else shared.pool.submit
        try:
            if kind == "sync":
                future = submit(sync_task, shared.started, task_id)
            else:
                future = submit(task, shared.started, task_id, kind == "fail")
        except RuntimeError as exc:
            self.refusal(exc, entry)
            return
        self.accepted("a submit", entry)
        if pin:
            shared.pinned.append(future)
        shared.submitted.append((future, task_id, kind == "fail"))
        if rng.random() < 0.1:
            self.cancel_one(future, task_id)  # at once: usually still queued

    def cancel(self) -> None:
        submitted = self.shared.submitted
        if submitted:
            future, task_id, _ = submitted[self.rng.randrange(len(submitted))]
            self.cancel_one(future, task_id)

    def cancel_one(self, future: Future[Any], task_id: int) -> None:
        state = cancel_and_classify(future)
        if state != FINISHED:
            self.shared.cancelled_by_threads.append(future)
        if state == PENDING:
            self.shared.never_start.append(task_id)

    def map(self) -> None:
        shared, rng = self.shared, self.rng
        n = rng.randint(1, 24)
        ids = [next(shared.ids) for _ in range(n)]
        take = rng.randint(0, n)
        try:
            results = shared.pool.map(
                sync_task if rng.random() < 0.3 else task_ok,
                itertools.repeat(shared.started),
                ids,
                chunksize=rng.randint(1, 4),
                buffersize=rng.choice((None, 1, 2, 4)),
            )
            self.accepted("a map")
            try:
                for task_id in ids[:take]:
                    assert next(results) == expected(task_id)
            finally:
                results.close()  # leaving early cancels what is outstanding
        except RuntimeError as exc:
            self.refusal(exc)
        except CancelledError:
            if not (shared.cancel_futures and shared.shutdown_begun.is_set()):
                raise

    def run_one(self) -> None:
        shared = self.shared
        task_id = next(shared.ids)
        try:
            assert shared.pool.run(task, shared.started, task_id, False) == expected(task_id)
        except RuntimeError as exc:
            self.refusal(exc)
            return
        except CancelledError:
            if not (shared.cancel_futures and shared.shutdown_begun.is_set()):
                raise
        self.accepted("a run")

    def check_stats(self) -> None:
        stats = self.shared.pool.stats()
        for snapshot in (stats, *stats.workers):
            figures = (snapshot.running, snapshot.queued, snapshot.completed)
            assert min(*figures, snapshot.failed, snapshot.cancelled) >= 0, stats
        assert stats.pending == stats.running + stats.queued, stats


async def task_ok(started: set[int], task_id: int) -> int:
    return await task(started, task_id, False)


def run_round(
    backend_kwargs: dict[str, Any], seed: int, shut_down_mid_way: bool, cancel_futures: bool
) -> None:
    rng = random.Random(seed)
    prefix = f"stress-{uuid.uuid4().hex[:8]}"
    pool = RecordingPool(
        rng.choice((2, 3, 4)),
        max_pending=rng.choice((None, 4, 16, 64)),
        thread_name_prefix=prefix,
        **backend_kwargs,
    )
    shared = Round(seed, pool, shut_down_mid_way, cancel_futures)
    threads = [
        threading.Thread(target=Submitter(shared, index).run, name=f"{prefix}-submitter-{index}")
        for index in range(SUBMITTERS)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        stuck = [thread.name for thread in threads if thread.is_alive()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # whatever happened, no thread is left
    where = f"seed {seed}"
    assert not stuck, f"{where}: submitters never ended: {stuck}"
    assert not shared.errors, f"{where}: {shared.errors}"
    check_outcomes(shared, where)


def check_outcomes(shared: Round, where: str) -> None:
    pool = shared.pool
    futures = [*pool.futures, *shared.pinned]
    _, not_done = wait(futures, timeout=TIMEOUT)
    assert not not_done, f"{where}: {len(not_done)} futures never ended"
    cancelled_by_threads = {id(future) for future in shared.cancelled_by_threads}
    for future, task_id, fails in shared.submitted:
        if future.cancelled():
            assert id(future) in cancelled_by_threads or shared.cancel_futures, (
                f"{where}: task {task_id} was cancelled by nobody"
            )
        elif fails:
            error = future.exception(timeout=0)
            assert type(error) is ValueError, f"{where}: {error!r}"
            assert error.args == (task_id,), f"{where}: {error!r}"
        else:
            assert future.result(timeout=0) == expected(task_id), where
    direct = {id(future) for future, _, _ in shared.submitted}
    for future in futures:  # those of map and run, which never fail
        if id(future) not in direct and not future.cancelled():
            assert future.exception(timeout=0) is None, f"{where}: {future.exception(0)!r}"
    started_late = set(shared.never_start) & shared.started
    assert not started_late, f"{where}: tasks started after a cancel while queued: {started_late}"

    stats = pool.stats()
    cancelled = sum(future.cancelled() for future in futures)
    failed = sum(not future.cancelled() and future.exception(0) is not None for future in futures)
    assert (stats.running, stats.queued, stats.pending) == (0, 0, 0), f"{where}: {stats}"
    assert (stats.completed, stats.failed, stats.cancelled) == (
        len(futures) - cancelled - failed,
        failed,
        cancelled,
    ), f"{where}: {stats}"
    limit = pool._pending_limit
    if limit is not None:
        assert limit.count == 0, f"{where}: max_pending count {limit.count} after the end"
        assert not limit._parked, where
        assert not limit._async_waiters, where
    for worker in pool.workers:
        assert worker._submitted == worker._exited_count, f"{where}: worker {worker.index}"


@pytest.mark.parametrize("cancel_futures", [False, True], ids=["wait", "cancel_futures"])
@pytest.mark.parametrize("shut_down_mid_way", [False, True], ids=["after", "mid-way"])
def test_sixteen_submitters_cancels_maps_and_shutdowns(
    backend_kwargs: dict[str, Any], shut_down_mid_way: bool, cancel_futures: bool
) -> None:
    for repeat in range(ROUNDS):
        seed = BASE_SEED + 4 * repeat + 2 * shut_down_mid_way + cancel_futures
        run_round(backend_kwargs, seed, shut_down_mid_way, cancel_futures)
