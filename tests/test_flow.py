"""Flow control: schedulers, worker_for, max_concurrency, max_pending, unordered and async
maps, and statistics, on every pool backend (and every caller backend for async APIs), on
both hosts.

What a task shares with the test (events, locks, lists) comes from the ``shared``
fixture: on the process host, proxies that reach a task in a worker process. A few tests
are about the thread host's internals and run there only (``pytest.mark.hosts``); the
process host's own behaviour has its tests at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, wait
from contextlib import aclosing, closing, contextmanager
from typing import Any

import anyio
import pytest

from portal_pool import (
    BrokenPortalPool,
    LeastLoaded,
    PoolStatistics,
    PortalPool,
    RoundRobin,
    Scheduler,
    Worker,
    WorkerStatistics,
    current_worker,
)

from .faults import kill_current_loop
from .helpers import CountingSource

HOSTS = ("thread", "process", "ray")

MakePool = Callable[..., PortalPool[Any]]
KeptPool = Callable[[int], PortalPool[Any]]


def hanging_items(shared: Any) -> tuple[Any, Any, Callable[[int], Awaitable[int]]]:
    """Item 0 returns at once; every other item says it entered, then waits until it is
    cancelled and says it cleaned up."""
    entered = shared.Semaphore(0)
    cleaned_up = shared.Semaphore(0)

    async def item(n: int) -> int:
        if n == 0:
            return 0
        entered.release()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.release()
        return n

    return entered, cleaned_up, item


SHUTDOWN_MESSAGE = "cannot schedule new futures after shutdown"


# -- helpers ---------------------------------------------------------------------------


async def until(event: Any) -> None:
    """Wait inside a worker loop for a shared event, without blocking the loop.

    A condition poll: cancellable, starts no thread, and bounded, so a broken test ends.
    """
    with anyio.fail_after(10):
        while not event.is_set():
            await anyio.sleep(0.002)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll a condition that only another thread can make true, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def worker_index() -> int:
    return current_worker().index


def noop() -> None:
    pass


async def square(n: int) -> int:
    await anyio.sleep(0)
    return n * n


class Boom(Exception):
    pass


def settle(pool: PortalPool[Any], pending: int = 0) -> None:
    """Return once every worker has taken what was submitted, and every call that has
    ended is counted; ``pending`` calls are left unfinished.

    On the thread host, a portal round trip queues behind earlier callbacks (a drain of
    the inbox, the bookkeeping after a task), so afterwards the counters are up to date:
    only for workers whose loop is not blocked. On the process host, the counters are
    the parent's: its link threads take the inboxes and count each call's end just after
    they settle its future.
    """
    if pool.host.name == "thread":
        for worker in pool.workers:
            worker.portal.call(noop)
    else:
        assert wait_until(
            lambda: not any(w._inbox for w in pool.workers) and pool.stats().pending == pending
        ), pool.stats()
    assert pool.stats().pending == pending


def hold(running: Any, release: Any) -> None:
    """A sync call: nothing else runs on its worker's loop until ``release`` is set."""
    running.set()
    assert release.wait(10)


@contextmanager
def loop_held(submit: Callable[..., Future[Any]], shared: Any) -> Iterator[Future[Any]]:
    """Hold a worker's loop with a sync call until the block exits; work queues behind it.

    ``submit`` is a worker's (or a one-worker pool's) ``submit``. Yields the holding
    call's future once that call is running; leaving the block lets it return ``None``.
    """
    running = shared.Event()
    release = shared.Event()
    holder = submit(hold, running, release)
    try:
        assert running.wait(10), "the loop never ran the holding call"
        yield holder
    finally:
        release.set()


class Fixed:
    """A scheduler that always picks the same index, valid or not."""

    def __init__(self, index: int) -> None:
        self.index = index

    def choose(self, loads: Sequence[int]) -> int:
        return self.index


class Recording:
    """A scheduler that records what it was shown and follows a script of choices."""

    def __init__(self, choices: Sequence[int]) -> None:
        self._choices = iter(choices)
        self.lengths: list[int] = []
        self.seen: list[list[int]] = []

    def choose(self, loads: Sequence[int]) -> int:
        self.lengths.append(len(loads))
        self.seen.append([loads[i] for i in range(len(loads))])
        return next(self._choices)


# -- scheduling -------------------------------------------------------------------------


def test_round_robin_hands_work_out_in_turn(make_pool: MakePool) -> None:
    pool = make_pool(3, schedule="round_robin")
    futures = [pool.submit(worker_index) for _ in range(7)]
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_is_the_default(make_pool: MakePool) -> None:
    pool = make_pool(2)
    assert [pool.run(worker_index) for _ in range(4)] == [0, 1, 0, 1]


def test_least_loaded_avoids_a_busy_worker(make_pool: MakePool, shared: Any) -> None:
    # With two workers, power of two choices always compares both of them.
    pool = make_pool(2, schedule="least_loaded")
    release = shared.Event()
    long_tasks = [pool.workers[0].submit(until, release) for _ in range(5)]
    try:
        # Each short task finishes before the next is chosen: worker 1 never has more
        # than one unfinished task, worker 0 always has five.
        assert [pool.run(worker_index) for _ in range(20)] == [1] * 20
        futures = [pool.submit(worker_index) for _ in range(4)]  # at most 4 < 5 on worker 1
        assert [f.result(timeout=10) for f in futures] == [1] * 4
    finally:
        release.set()
    for future in long_tasks:
        future.result(timeout=10)


def test_least_loaded_with_one_worker(make_pool: MakePool) -> None:
    pool = make_pool(1, schedule="least_loaded")
    assert [pool.run(worker_index) for _ in range(3)] == [0, 0, 0]


def test_least_loaded_policy_compares_the_two_it_samples() -> None:
    policy = LeastLoaded(seed=1)
    assert {policy.choose([7, 0]) for _ in range(50)} == {1}
    assert {policy.choose([0, 7]) for _ in range(50)} == {0}
    assert {policy.choose([5]) for _ in range(5)} == {0}
    # Never the worst of three when it samples two distinct ones.
    assert 0 not in {policy.choose([9, 1, 1]) for _ in range(100)}


def test_custom_scheduler_sees_live_unfinished_counts(make_pool: MakePool, shared: Any) -> None:
    scheduler = Recording([1, 1, 0])
    pool = make_pool(3, schedule=scheduler)
    assert isinstance(scheduler, Scheduler)
    release = shared.Event()
    try:
        held = [pool.workers[0].submit(until, release) for _ in range(2)]
        held.append(pool.workers[2].submit(until, release))
        # Pinned submissions bypass the scheduler but count in its loads.
        assert scheduler.seen == []
        held.append(pool.submit(until, release))  # the scheduler sends it to worker 1
        routed = pool.submit(worker_index)  # and this one to worker 1 as well
        assert scheduler.lengths == [3, 3]
        assert scheduler.seen == [[2, 0, 1], [2, 1, 1]]
        assert routed.result(timeout=10) == 1
    finally:
        release.set()
    for future in held:
        future.result(timeout=10)
    settle(pool)
    assert pool.run(worker_index) == 0  # third choice
    assert scheduler.seen[-1] == [0, 0, 0]


class FewestFirst:
    """The README's example policy: scan every worker, take the least loaded."""

    def choose(self, loads: Sequence[int]) -> int:
        return min(range(len(loads)), key=loads.__getitem__)


def test_readme_scan_every_worker_policy(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(3, schedule=FewestFirst())
    release = shared.Event()
    held = [pool.workers[0].submit(until, release) for _ in range(2)]
    held.append(pool.workers[1].submit(until, release))
    try:
        # Loads [2, 1, 0] -> worker 2 -> [2, 1, 1] -> worker 1 -> [2, 2, 1] -> worker 2
        # -> [2, 2, 2] -> worker 0 (the first of the least loaded) -> [3, 2, 2].
        held += [pool.submit(until, release) for _ in range(4)]
        assert [w.running + w.queued for w in pool.stats().workers] == [3, 2, 2]
        assert pool.submit(worker_index).result(timeout=10) == 1
    finally:
        release.set()
    for future in held:
        future.result(timeout=10)


def test_scheduler_instances_can_be_passed(make_pool: MakePool) -> None:
    pool = make_pool(2, schedule=RoundRobin())
    assert [pool.run(worker_index) for _ in range(3)] == [0, 1, 0]
    pool = make_pool(2, schedule=LeastLoaded(seed=3))
    assert pool.run(worker_index) in (0, 1)


@pytest.mark.parametrize("index", [2, -1, 99])
def test_scheduler_choosing_a_bad_index_raises(make_pool: MakePool, index: int) -> None:
    pool = make_pool(2, schedule=Fixed(index))
    with pytest.raises(ValueError, match=rf"scheduler chose worker {index}"):
        pool.submit(noop)
    with pytest.raises(ValueError, match="scheduler chose worker"):
        pool.run(noop)
    with pytest.raises(ValueError, match="scheduler chose worker"):
        pool.map_unordered(noop, range(3))
    assert pool.stats().pending == 0  # nothing was queued anywhere
    assert pool.workers[1].run(worker_index) == 1  # pinned work does not ask the scheduler


def test_unknown_schedule_name_is_a_value_error(backend_kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown schedule 'fastest'"):
        PortalPool(2, schedule="fastest", **backend_kwargs)


@pytest.mark.parametrize(
    "schedule",
    [object(), 3, None, lambda loads: 0],
    ids=["object", "int", "None", "bare-function"],
)
def test_schedule_without_choose_is_a_type_error(
    backend_kwargs: dict[str, Any], schedule: Any
) -> None:
    with pytest.raises(TypeError, match="choose"):
        PortalPool(2, schedule=schedule, **backend_kwargs)


def test_scheduler_class_instead_of_instance_is_a_type_error(
    backend_kwargs: dict[str, Any],
) -> None:
    # A runtime_checkable Protocol accepts the class itself (it has a 'choose'
    # attribute); every submit would then fail. It is refused up front instead.
    with pytest.raises(TypeError, match=r"pass an instance"):
        PortalPool(2, schedule=LeastLoaded, **backend_kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 1.5}, "max_concurrency"),
        ({"max_pending": 0}, "max_pending"),
        ({"max_pending": -3}, "max_pending"),
        ({"stall_timeout": 0}, "stall_timeout"),
        ({"stall_timeout": -1.0}, "stall_timeout"),
    ],
)
def test_bad_limits_are_value_errors(
    backend_kwargs: dict[str, Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PortalPool(2, **kwargs, **backend_kwargs)


# -- worker_for ---------------------------------------------------------------------------


def test_worker_for_is_stable(kept_pool: KeptPool) -> None:
    pool = kept_pool(4)
    keys: list[Hashable] = [0, 1, -1, 2**70, "tenant-a", b"tenant-a", ("t", 3), 2.5, None]
    first = [pool.worker_for(key) for key in keys]
    assert all(isinstance(worker, Worker) for worker in first)
    for _ in range(3):
        assert [pool.worker_for(key) for key in keys] == first
    # Equal keys hash alike, so they share a worker.
    assert pool.worker_for(1) is pool.worker_for(1.0) is pool.worker_for(True)
    # And the work really runs there.
    for key in ("tenant-a", 2**70):
        target = pool.worker_for(key)
        assert target.run(worker_index) == target.index


def _spread(pool: PortalPool[Any], keys: Iterator[Hashable]) -> list[int]:
    counts = Counter(pool.worker_for(key).index for key in keys)
    return [counts[index] for index in range(len(pool.workers))]


KEY_FAMILIES: dict[str, Callable[[], Iterator[Hashable]]] = {
    "ints": lambda: iter(range(10_000)),
    "negative-ints": lambda: iter(range(-10_000, 0)),
    "multiples-of-the-worker-count": lambda: iter(range(0, 40_000, 4)),
    "strs": lambda: (f"tenant-{n}" for n in range(10_000)),
    "tuples": lambda: ((n, "region") for n in range(10_000)),
}


@pytest.mark.parametrize("family", sorted(KEY_FAMILIES))
@pytest.mark.parametrize("workers", [4, 3])
def test_worker_for_spreads_keys_evenly(kept_pool: KeptPool, family: str, workers: int) -> None:
    pool = kept_pool(workers)
    counts = _spread(pool, KEY_FAMILIES[family]())
    even = 10_000 / workers
    assert all(abs(count - even) <= 0.1 * even for count in counts), counts


def test_worker_for_spreads_keys_differing_in_high_bits(kept_pool: KeptPool) -> None:
    # Regression: the worker used to be (mixed >> 32) % n, which for a power-of-two n
    # depends on the low 34 bits of the hash only, so all of these went to worker 0.
    pool = kept_pool(4)
    for keys in ([n << 40 for n in range(10_000)], [n * 2.0**40 for n in range(10_000)]):
        counts = _spread(pool, iter(keys))
        assert all(abs(count - 2500) <= 250 for count in counts), counts


# -- max_concurrency -----------------------------------------------------------------------


def test_max_concurrency_is_never_exceeded(make_pool: MakePool, shared: Any) -> None:
    # On the process host the cap is the parent's: it sends a child no more than that,
    # and the rest wait in the parent.
    pool = make_pool(2, max_concurrency=3)
    lock = shared.Lock()
    running = shared.list([0, 0])
    peak = shared.list([0, 0])
    entered = shared.Semaphore(0)
    release = shared.Event()

    async def task(n: int) -> int:
        index = current_worker().index
        with lock:
            running[index] += 1
            peak[index] = max(peak[index], running[index])
        entered.release()
        try:
            await until(release)
        finally:
            with lock:
                running[index] -= 1
        return n

    try:
        futures = [pool.submit(task, n) for n in range(40)]  # 20 per worker
        for _ in range(6):
            assert entered.acquire(timeout=10)
        stats = pool.stats()
        assert [w.running for w in stats.workers] == [3, 3]
        assert [w.queued for w in stats.workers] == [17, 17]
        assert (stats.running, stats.queued, stats.pending) == (6, 34, 40)
        assert list(peak) == [3, 3]
    finally:
        release.set()
    assert [f.result(timeout=10) for f in futures] == list(range(40))
    assert list(peak) == [3, 3]


def test_max_concurrency_holds_for_pinned_and_async_submissions(
    make_pool: MakePool, shared: Any
) -> None:
    pool = make_pool(1, max_concurrency=2)
    lock = shared.Lock()
    counts = shared.dict(running=0, peak=0)

    async def task() -> None:
        with lock:
            counts["running"] += 1
            counts["peak"] = max(counts["peak"], counts["running"])
        for _ in range(3):
            await anyio.sleep(0.001)
        with lock:
            counts["running"] -= 1

    async def fan_out() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(10):
                group.start_soon(pool.workers[0].run_async, task)

    futures = [pool.workers[0].submit(task) for _ in range(10)]
    anyio.run(fan_out)
    for future in futures:
        future.result(timeout=10)
    assert 1 <= counts["peak"] <= 2


def test_work_cancelled_behind_the_cap_never_starts(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(1, max_concurrency=1)
    started = shared.Event()
    release = shared.Event()
    ran = shared.list()

    async def blocker() -> None:
        started.set()
        await until(release)

    async def must_not_run(n: int) -> None:
        ran.append(n)

    held = pool.submit(blocker)
    try:
        assert started.wait(10)
        waiting = [pool.submit(must_not_run, n) for n in range(5)]
        settle(pool, pending=6)  # drained: they wait behind the cap, in the worker
        assert pool.stats().queued == 5
        assert all(future.cancel() for future in waiting)
        assert all(future.cancelled() for future in waiting)
        assert pool.stats().cancelled == 5
        assert pool.stats().queued == 0
    finally:
        release.set()
    held.result(timeout=10)
    assert pool.run(lambda: "after") == "after"  # queued behind the cancelled ones
    assert list(ran) == []


@pytest.mark.parametrize("drained", [True, False], ids=["in-worker", "in-inbox"])
def test_shutdown_cancel_futures_cancels_waiting_work(
    make_pool: MakePool, shared: Any, drained: bool
) -> None:
    pool = make_pool(1, max_concurrency=1)
    started = shared.Event()
    cleaned_up = shared.Event()
    ran = shared.list()

    async def blocker() -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned_up.set()

    async def must_not_run(n: int) -> None:
        ran.append(n)

    held = pool.submit(blocker)
    assert started.wait(10)
    waiting = [pool.submit(must_not_run, n) for n in range(5)]
    if drained:
        settle(pool, pending=6)
    pool.shutdown(wait=True, cancel_futures=True)
    assert held.cancelled()
    assert cleaned_up.is_set()
    assert all(future.cancelled() for future in waiting)
    assert list(ran) == []
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.cancelled, stats.pending) == (0, 0, 6, 0)


def test_graceful_shutdown_runs_work_waiting_behind_the_cap(
    make_pool: MakePool, shared: Any
) -> None:
    pool = make_pool(1, max_concurrency=1)
    order = shared.list()

    async def task(n: int) -> int:
        await anyio.sleep(0)
        order.append(n)
        return n

    futures = [pool.submit(task, n) for n in range(8)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(8))
    assert list(order) == list(range(8))  # one at a time, in submission order


# -- max_pending ----------------------------------------------------------------------------


class Submitter:
    """A thread that submits one task and records what happened."""

    def __init__(self, pool: PortalPool[Any], fn: Callable[[], Any]) -> None:
        self.about_to_submit = threading.Event()
        self.future: Future[Any] | None = None
        self.error: BaseException | None = None
        self._pool = pool
        self._fn = fn
        self.thread = threading.Thread(target=self._run, name="test-submitter")
        self.thread.start()

    def _run(self) -> None:
        self.about_to_submit.set()
        try:
            self.future = self._pool.submit(self._fn)
        except BaseException as exc:
            self.error = exc

    def assert_blocked(self) -> None:
        assert self.about_to_submit.wait(10)
        # Can only pass falsely (not yet at the wait), never fail falsely.
        self.thread.join(timeout=0.1)
        assert self.thread.is_alive()
        assert self.future is None
        assert self.error is None

    def join(self) -> None:
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def test_submit_blocks_when_full_and_wakes_when_a_task_finishes(
    make_pool: MakePool, shared: Any
) -> None:
    pool = make_pool(2, max_pending=2)
    gates = [shared.Event(), shared.Event()]

    async def gated(index: int) -> int:
        await until(gates[index])
        return index

    first = pool.submit(gated, 0)
    second = pool.submit(gated, 1)
    submitter = Submitter(pool, lambda: "third")
    try:
        submitter.assert_blocked()
        assert pool.stats().pending == 2
        gates[1].set()  # one task finishes: room for exactly one more
        submitter.join()
        assert second.result(timeout=10) == 1
        assert submitter.future is not None
        assert submitter.future.result(timeout=10) == "third"
        assert not first.done()
    finally:
        for gate in gates:
            gate.set()
        submitter.thread.join(timeout=10)
    assert first.result(timeout=10) == 0


def test_blocked_submit_wakes_at_shutdown(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(1, max_pending=1)
    release = shared.Event()
    held = pool.submit(until, release)
    submitter = Submitter(pool, noop)
    try:
        submitter.assert_blocked()
        pool.shutdown(wait=False)
        submitter.join()
        assert isinstance(submitter.error, RuntimeError)
        assert str(submitter.error) == SHUTDOWN_MESSAGE
        assert submitter.future is None
    finally:
        release.set()
        submitter.thread.join(timeout=10)
    pool.shutdown(wait=True)
    assert held.result(timeout=0) is None
    assert pool.stats().completed == 1


def test_cancelling_queued_work_gives_its_room_back(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(1, max_pending=2, max_concurrency=1)
    release = shared.Event()
    held = pool.submit(until, release)
    queued = pool.submit(noop)
    submitter = Submitter(pool, lambda: "room")
    try:
        submitter.assert_blocked()
        assert queued.cancel()
        submitter.join()
        assert submitter.future is not None
    finally:
        release.set()
        submitter.thread.join(timeout=10)
    assert submitter.future.result(timeout=10) == "room"
    assert held.result(timeout=10) is None


# Thread host only: a task in a worker process cannot reach the pool, see
# test_a_task_in_a_worker_process_cannot_reach_the_pool.
@pytest.mark.hosts("thread")
def test_submit_from_inside_the_worker_when_full_raises(make_pool: MakePool) -> None:
    pool = make_pool(1, max_pending=1)

    def inner() -> list[str]:
        errors = []
        for submit in (current_worker().submit, pool.submit):
            try:
                submit(noop)
            except RuntimeError as exc:
                errors.append(str(exc))
        return errors

    errors = pool.submit(inner).result(timeout=10)
    assert len(errors) == 2
    assert all("deadlock" in error and "max_pending=1" in error for error in errors)
    assert pool.run(lambda: "still serving") == "still serving"


@pytest.mark.hosts("thread")  # as above
@pytest.mark.parametrize("via", ["pool", "other-worker"])
def test_submit_to_another_worker_from_inside_a_worker_when_full_raises(
    make_pool: MakePool, via: str
) -> None:
    # Regression: only the worker's *own* loop was refused, so a task on worker 1 holding
    # the only room blocked its loop forever waiting for room on worker 0.
    pool = make_pool(2, max_pending=1)

    def inner() -> str:
        # Round robin starts at worker 0: either way the target is not this task's worker.
        submit = pool.submit if via == "pool" else pool.workers[0].submit
        try:
            submit(noop)
        except RuntimeError as exc:
            return str(exc)
        return "submitted"

    outer = pool.workers[1].submit(inner)
    done, _ = wait([outer], timeout=5)
    if not done:
        pool.shutdown(wait=False)  # unblock a deadlocked loop so that the test ends
    assert "deadlock" in outer.result(timeout=10)
    assert pool.stats().pending <= 1


@pytest.mark.anyio
async def test_run_async_waits_for_room_without_blocking_its_loop(
    make_pool: MakePool, shared: Any
) -> None:
    pool = make_pool(1, max_pending=1)
    release = shared.Event()
    held = pool.submit(until, release)
    # Failsafe: if run_async blocked this loop, the pool frees up anyway after a while and
    # the assertions below fail instead of hanging.
    failsafe = threading.Timer(5, release.set)
    failsafe.start()
    results: list[str] = []
    try:
        async with anyio.create_task_group() as group:

            async def call() -> None:
                results.append(await pool.run_async(lambda: "got room"))

            group.start_soon(call)
            await anyio.wait_all_tasks_blocked()  # call() is parked, waiting for room
            ticks = 0
            for _ in range(20):  # the caller's loop keeps running meanwhile
                await anyio.sleep(0)
                ticks += 1
            assert ticks == 20
            assert results == []
            assert not release.is_set()
            assert pool.stats().pending == 1
            release.set()
    finally:
        failsafe.cancel()
        failsafe.join()
    assert results == ["got room"]
    assert held.result(timeout=10) is None


@pytest.mark.anyio
async def test_cancelled_run_async_waiting_for_room_takes_none(
    make_pool: MakePool, shared: Any
) -> None:
    pool = make_pool(1, max_pending=1)
    release = shared.Event()
    held = pool.submit(until, release)
    ran = shared.list()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(pool.run_async, ran.append, "must not run")
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    release.set()
    await anyio.to_thread.run_sync(held.result, 10)
    # The room is back, and the cancelled call never ran.
    with anyio.fail_after(10):
        assert await pool.run_async(lambda: "room") == "room"
        assert await pool.run_async(lambda: "again") == "again"
    assert list(ran) == []


@pytest.mark.anyio
async def test_async_maps_respect_max_pending(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(2, max_pending=2)
    lock = shared.Lock()
    counts = shared.dict(pending=0, peak=0)

    async def task(n: int) -> int:
        with lock:
            counts["pending"] += 1
            counts["peak"] = max(counts["peak"], counts["pending"])
        await anyio.sleep(0.001)
        with lock:
            counts["pending"] -= 1
        return n

    with anyio.fail_after(10):
        assert [n async for n in pool.map_async(task, range(20))] == list(range(20))
        assert sorted([n async for n in pool.map_unordered_async(task, range(20))]) == list(
            range(20)
        )
    assert 1 <= counts["peak"] <= 2


# -- map_unordered ----------------------------------------------------------------------------


def test_map_unordered_yields_faster_items_first(kept_pool: KeptPool, shared: Any) -> None:
    pool = kept_pool(2)
    gates = [shared.Event() for _ in range(5)]

    async def item(n: int) -> int:
        await until(gates[n])
        return n

    results = pool.map_unordered(item, range(5))
    try:
        for n in (3, 0, 4, 1, 2):
            gates[n].set()
            assert next(results) == n
        assert list(results) == []
    finally:
        for gate in gates:
            gate.set()


def test_map_unordered_with_several_iterables_and_errors(kept_pool: KeptPool) -> None:
    pool = kept_pool(2)
    assert sorted(pool.map_unordered(pow, [2, 3, 4], [3, 2, 1, 99])) == [4, 8, 9]

    async def check(n: int) -> int:
        if n == 3:
            raise Boom(n)
        return n

    with pytest.raises(Boom, match="3"):
        list(pool.map_unordered(check, range(6)))


def test_map_unordered_bounded_window_reads_input_lazily(kept_pool: KeptPool) -> None:
    pool = kept_pool(2)
    source = CountingSource(100)

    results = pool.map_unordered(square, source, buffersize=3)
    assert source.consumed == 3  # the first window
    taken: list[int] = []
    for value in results:
        taken.append(value)
        assert source.consumed <= len(taken) + 3  # one more unit per result taken
    assert sorted(taken) == [n * n for n in range(100)]


def test_map_unordered_leaving_early_cancels_outstanding(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(2)
    entered, cleaned_up, item = hanging_items(shared)

    with closing(pool.map_unordered(item, range(5))) as results:
        for value in results:
            assert value == 0
            for _ in range(4):
                assert entered.acquire(timeout=10)
            break
    for _ in range(4):
        assert cleaned_up.acquire(timeout=10)
    pool.shutdown(wait=True)
    stats = pool.stats()
    assert (stats.completed, stats.cancelled) == (1, 4)


def test_map_unordered_leaving_early_stops_reading_input(make_pool: MakePool) -> None:
    pool = make_pool(1)
    source = CountingSource(1000)

    async def item(n: int) -> int:
        if n:
            await anyio.sleep(3600)
        return n

    results = pool.map_unordered(item, source, buffersize=4)
    assert next(results) == 0
    results.close()
    pool.shutdown(wait=True)
    assert source.consumed == 5
    assert pool.stats().cancelled == 4


# -- map_async / map_unordered_async -------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("buffersize", [None, 1, 4])
async def test_map_async_results_in_order(kept_pool: KeptPool, buffersize: int | None) -> None:
    pool = kept_pool(3)
    with anyio.fail_after(10):
        results = [x async for x in pool.map_async(square, range(40), buffersize=buffersize)]
        assert results == [n * n for n in range(40)]
        assert [x async for x in pool.map_async(pow, [2, 3, 4], [3, 2])] == [8, 9]


@pytest.mark.anyio
async def test_map_async_reads_input_lazily(kept_pool: KeptPool) -> None:
    pool = kept_pool(2)
    source = CountingSource(50)

    taken = 0
    with anyio.fail_after(10):
        async for value in pool.map_async(square, source, buffersize=3):
            assert value == taken * taken
            taken += 1
            assert source.consumed <= taken + 3
    assert taken == 50


@pytest.mark.anyio
async def test_map_async_raises_at_the_failing_item(kept_pool: KeptPool) -> None:
    pool = kept_pool(2)

    async def check(n: int) -> int:
        if n == 4:
            raise Boom(n)
        return n

    seen: list[int] = []
    with anyio.fail_after(10), pytest.raises(Boom, match="4"):
        async with aclosing(pool.map_async(check, range(10))) as results:
            async for value in results:
                seen.append(value)
    assert seen == [0, 1, 2, 3]


@pytest.mark.anyio
async def test_map_unordered_async_yields_in_completion_order(
    kept_pool: KeptPool, shared: Any
) -> None:
    pool = kept_pool(2)
    gates = [shared.Event() for _ in range(5)]

    async def item(n: int) -> int:
        await until(gates[n])
        return n

    try:
        async with aclosing(pool.map_unordered_async(item, range(5))) as results:
            for n in (2, 4, 0, 3, 1):
                gates[n].set()
                with anyio.fail_after(10):
                    assert await anext(results) == n
            with pytest.raises(StopAsyncIteration):
                await anext(results)
    finally:
        for gate in gates:
            gate.set()


@pytest.mark.anyio
@pytest.mark.parametrize("ordered", [True, False], ids=["map_async", "map_unordered_async"])
async def test_breaking_out_of_an_async_map_cancels_the_rest(
    make_pool: MakePool, shared: Any, ordered: bool
) -> None:
    pool = make_pool(2)
    entered, cleaned_up, item = hanging_items(shared)

    mapper = pool.map_async if ordered else pool.map_unordered_async
    with anyio.fail_after(10):
        async with aclosing(mapper(item, range(5))) as results:
            async for value in results:
                assert value == 0
                for _ in range(4):
                    assert await anyio.to_thread.run_sync(entered.acquire, True, 10)
                break
        # Leaving the block cancelled the four sleepers; their finally blocks ran.
        for _ in range(4):
            assert await anyio.to_thread.run_sync(cleaned_up.acquire, True, 10)
    await anyio.to_thread.run_sync(pool.shutdown)
    stats = pool.stats()
    assert (stats.completed, stats.cancelled, stats.pending) == (1, 4, 0)


# -- stats ------------------------------------------------------------------------------------


def test_stats_are_frozen_snapshots(make_pool: MakePool) -> None:
    pool = make_pool(2)
    before = pool.stats()
    assert isinstance(before, PoolStatistics)
    assert dataclasses.is_dataclass(before)
    assert all(isinstance(w, WorkerStatistics) for w in before.workers)
    counters = ("running", "queued", "completed", "failed", "cancelled", "restarts", "stalls")
    assert all(getattr(before, name) == 0 for name in (*counters, "pending"))
    assert [w.index for w in before.workers] == [0, 1]
    for idle in before.workers:
        assert all(getattr(idle, name) == 0 for name in counters)
        assert idle.loop_lag is None  # no watchdog
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.completed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.workers[0].running = 1  # type: ignore[misc]
    assert pool.run(worker_index) == 0
    settle(pool)
    after = pool.stats()
    assert before.completed == 0  # a snapshot, not a view
    assert after.completed == 1
    assert after.workers[0].completed == 1
    assert after.workers[1].completed == 0


def test_stats_account_for_every_task(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(2)
    worker = pool.workers[0]

    async def fail() -> None:
        raise Boom

    def fail_sync() -> None:
        raise Boom

    ok = [pool.submit(square, n) for n in range(10)]
    bad = [pool.submit(fail) for _ in range(3)] + [pool.submit(fail_sync) for _ in range(2)]

    # Cancelled while queued: behind a sync call that holds worker 0's loop.
    with loop_held(worker.submit, shared) as holder:
        queued = [worker.submit(noop) for _ in range(4)]
        assert all(f.cancel() for f in queued)

    # Cancelled while running.
    started = shared.Semaphore(0)

    async def sleeper() -> None:
        started.release()
        await anyio.sleep(3600)

    running = [pool.submit(sleeper) for _ in range(3)]
    for _ in running:
        assert started.acquire(timeout=10)
    assert all(f.cancel() for f in running)

    submitted = len(ok) + len(bad) + 1 + len(queued) + len(running)
    pool.shutdown(wait=True)
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.cancelled) == (11, 5, 7)
    assert stats.completed + stats.failed + stats.cancelled == submitted
    assert (stats.running, stats.queued, stats.pending) == (0, 0, 0)
    for field in ("completed", "failed", "cancelled", "running", "queued", "restarts"):
        assert getattr(stats, field) == sum(getattr(w, field) for w in stats.workers)
    assert holder.result(timeout=0) is None
    assert all(isinstance(f.exception(timeout=0), Boom) for f in bad)


def test_stats_account_for_shutdown_cancel_futures(make_pool: MakePool, shared: Any) -> None:
    # Regression (asyncio/uvloop): futures cancelled in the inbox were drained into tasks
    # that shutdown then cancelled before their first step, and counted a second time.
    pool = make_pool(1)
    with loop_held(pool.submit, shared) as holder:
        queued = [pool.submit(noop) for _ in range(5)]
        pool.shutdown(wait=False, cancel_futures=True)
    pool.shutdown(wait=True)
    assert holder.result(timeout=0) is None
    assert all(f.cancelled() for f in queued)
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.cancelled) == (1, 0, 5)


def test_stats_reflect_a_blocked_worker(make_pool: MakePool, shared: Any, pool_host: str) -> None:
    pool = make_pool(2)
    worker = pool.workers[0]
    with loop_held(worker.submit, shared) as holder:
        queued = [worker.submit(noop) for _ in range(3)]
        running = 1
        if pool_host != "thread":
            # A worker process is sent every call (no max_concurrency): once they are
            # sent, the parent counts as running all that the child holds, though there
            # they wait for the loop.
            settle(pool, pending=4)
            running = 4
        stats = pool.stats()
        assert (stats.workers[0].running, stats.workers[0].queued) == (running, 4 - running)
        assert (stats.workers[1].running, stats.workers[1].queued) == (0, 0)
        assert (stats.running, stats.queued, stats.pending) == (running, 4 - running, 4)
    holder.result(timeout=10)
    for future in queued:
        future.result(timeout=10)
    settle(pool)
    stats = pool.stats()
    assert (stats.running, stats.queued, stats.pending, stats.completed) == (0, 0, 0, 4)


def test_stats_count_running_async_tasks(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(1)
    started = shared.Semaphore(0)
    release = shared.Event()

    async def task() -> None:
        started.release()
        await until(release)

    futures = [pool.submit(task) for _ in range(3)]
    try:
        for _ in futures:
            assert started.acquire(timeout=10)
        stats = pool.stats()
        assert (stats.running, stats.queued, stats.pending) == (3, 0, 3)
        assert stats.workers[0].loop_lag is None  # no watchdog
    finally:
        release.set()
    for future in futures:
        future.result(timeout=10)


class SeeStats(logging.Handler):
    """Takes a pool's statistics as each record is logged: what they say by then."""

    def __init__(self, pool: PortalPool[Any]) -> None:
        super().__init__()
        self._pool = pool
        self.seen: list[tuple[str, PoolStatistics]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), self._pool.stats()))


@contextmanager
def stats_at_each_record(pool: PortalPool[Any]) -> Iterator[SeeStats]:
    handler = SeeStats(pool)
    logger = logging.getLogger("portal_pool")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_stats_count_restarts(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(2)
    worker = pool.workers[1]

    async def killer() -> None:
        kill_current_loop()
        await anyio.sleep(3600)

    with stats_at_each_record(pool) as records:
        doomed = worker.submit(killer)
        # Its future resolves only as the loop dies, so this next task runs on the new
        # loop, which starts after the restart is counted.
        wait([doomed], timeout=10)
        assert doomed.done()
        assert worker.run(worker_index) == 1
        stats = pool.stats()
    assert stats.restarts == 1
    # Counted by the time it is logged (from a worker process, too).
    assert [s.restarts for message, s in records.seen if "restarting" in message] == [1]
    assert [w.restarts for w in stats.workers] == [0, 1]
    assert [w.stalls for w in stats.workers] == [0, 0]
    assert any("restarting" in r.getMessage() for r in caplog.records)


def test_cancelling_waiting_work_is_counted_at_once(make_pool: MakePool, shared: Any) -> None:
    # On the process host the waiting call is in the parent: cancelling it is free, with
    # no message to the child and no wait for an answer.
    pool = make_pool(1, max_concurrency=1)
    release = shared.Event()
    held = pool.submit(until, release)
    try:
        waiting = pool.submit(noop)
        waiting.cancel()
        with pytest.raises(CancelledError):
            waiting.result(timeout=0)
        assert pool.stats().cancelled == 1
    finally:
        release.set()
    held.result(timeout=10)


# -- the process host's own behaviour -----------------------------------------------------


async def pid_once_set(release: Any) -> int:
    await until(release)
    return os.getpid()


@pytest.mark.hosts("process")
def test_work_waiting_behind_the_cap_survives_a_childs_death(
    make_pool: MakePool, shared: Any
) -> None:
    # max_concurrency is the parent's window: what waits behind it was never sent, so a
    # child that dies cannot take it along; it runs in the replacement.
    pool = make_pool(1, max_concurrency=2)
    started = shared.Semaphore(0)
    release = shared.Event()
    first_pid = pool.workers[0].pid

    async def in_flight() -> None:
        started.release()
        await anyio.sleep(3600)

    doomed = [pool.submit(in_flight) for _ in range(2)]
    for _ in doomed:
        assert started.acquire(timeout=10)
    waiting = [pool.submit(pid_once_set, release) for _ in range(3)]
    stats = pool.stats()
    assert (stats.running, stats.queued, stats.pending) == (2, 3, 5)
    os.kill(first_pid, signal.SIGKILL)
    for future in doomed:
        with pytest.raises(BrokenPortalPool, match="SIGKILL"):
            future.result(timeout=10)
    release.set()
    pids = [future.result(timeout=10) for future in waiting]
    assert pids == [pool.workers[0].pid] * 3
    assert pids[0] != first_pid
    stats = pool.stats()
    assert (stats.restarts, stats.failed) == (1, 2)


@pytest.mark.hosts("process", "ray")
def test_a_task_in_a_worker_process_cannot_reach_the_pool(make_pool: MakePool) -> None:
    # The process host's side of test_submit_from_inside_the_worker_when_full_raises.
    pool = make_pool(1, max_pending=1)

    def through_the_pool() -> None:
        pool.submit(noop)

    with pytest.raises(TypeError, match="a PortalPool cannot be sent to a worker"):
        pool.submit(through_the_pool)
    assert pool.stats().pending == 0  # the room it took is back

    async def nested() -> int:
        # current_worker() is the child's own worker: this runs in the same child, and
        # the parent's max_pending (full now, with this task) neither holds nor sees it.
        future = current_worker().submit(square, 7)
        while not future.done():
            await anyio.sleep(0.001)
        return future.result()

    assert pool.submit(nested).result(timeout=10) == 49
    settle(pool)
    assert pool.stats().completed == 1
