"""Stateful property tests: random interleavings of everything a caller can do to a pool.

A hypothesis ``RuleBasedStateMachine``, run on every pool backend, drives submits of
tasks that succeed, fail, wait on a gate or raise a ``BaseException``; ``cancel()``
before and while they run; ``run_async`` from asyncio and trio callers that are
cancelled at random moments; ``map`` windows abandoned half way; and shutdowns with and
without ``cancel_futures``. After the pool is shut down every future must be resolved,
with the right outcome, no worker thread may be left, no task may have started after
its future was cancelled while still pending, and ``pool.stats()`` must account for
every future exactly once.

Two bugs turned up while building the machine (both since fixed); their deterministic
reproductions stay at the end of this file as regression tests.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import itertools
import math
import os
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import Future, wait
from concurrent.futures._base import (  # the states are not re-exported publicly
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from portal_pool import PortalPool

from .helpers import cancel_and_classify, loop_held

T = TypeVar("T")

HAVE_TRIO = importlib.util.find_spec("trio") is not None
CALLERS = ["asyncio", "trio"] if HAVE_TRIO else ["asyncio"]

#: Every blocking wait in this file is bounded by this many seconds.
TIMEOUT = 10.0

#: ``PORTAL_POOL_STATEFUL_EXAMPLES=500`` explores longer than the default quick run.
SETTINGS = settings(
    max_examples=int(os.environ.get("PORTAL_POOL_STATEFUL_EXAMPLES", "25")),
    stateful_step_count=30,
    deadline=None,
)

#: How often each interesting interleaving was reached, over every run in the session.
#: Printed at the end of the stateful test (visible with ``-s``).
REACHED: Counter[str] = Counter()


class Boom(BaseException):
    """A ``BaseException`` that is neither ``KeyboardInterrupt`` nor ``SystemExit``."""


RAISES: dict[str, type[BaseException]] = {
    "fail": ValueError,
    "keyboard": KeyboardInterrupt,
    "exit": SystemExit,
    "boom": Boom,
}
# "gated" twice: gated tasks are the ones that stay running for other rules to act on.
SUBMIT_KINDS = ["ok", "sleep", "gated", "gated", "sync", *RAISES]


def expected(task_id: int) -> int:
    """The value a successful task returns: derived from its input."""
    return task_id * 3 + 1


# -- instrumentation shared by the test thread and the worker loops -------------------------


class Tracker:
    """Which task ids started (ran their first line) and finished (ran their ``finally``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self._started_events: dict[int, threading.Event] = {}
        self._finished_events: dict[int, threading.Event] = {}

    def expect(self, task_id: int) -> None:
        """Create the events a rule may wait on, before the task can possibly run."""
        with self._lock:
            self._started_events[task_id] = threading.Event()
            self._finished_events[task_id] = threading.Event()

    def start(self, task_id: int) -> None:
        with self._lock:
            self.started.add(task_id)
            started = self._started_events.get(task_id)
        if started is not None:
            started.set()

    def finish(self, task_id: int) -> None:
        with self._lock:
            self.finished.add(task_id)
            finished = self._finished_events.get(task_id)
        if finished is not None:
            finished.set()

    def has_started(self, task_id: int) -> bool:
        with self._lock:
            return task_id in self.started

    def has_finished(self, task_id: int) -> bool:
        with self._lock:
            return task_id in self.finished

    def wait_started(self, task_id: int) -> bool:
        return self._started_events[task_id].wait(TIMEOUT)

    def wait_finished(self, task_id: int) -> bool:
        return self._finished_events[task_id].wait(TIMEOUT)

    def snapshot(self) -> tuple[set[int], set[int]]:
        with self._lock:
            return set(self.started), set(self.finished)


class Gate:
    """A one-shot gate opened from any thread and awaited in a worker's loop.

    A ``threading.Event`` cannot be awaited, and polling it would be sleeping and
    hoping; the waiter instead parks a native event of its own loop, which ``open()``
    sets through that loop's thread-safe scheduling call without ever waiting for it.
    """

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._opened = False
        self._wake: Callable[[], None] | None = None

    @property
    def opened(self) -> bool:
        return self._opened

    def open(self) -> None:
        with self._lock:
            self._opened = True
            wake, self._wake = self._wake, None
        if wake is not None:
            wake()

    async def wait(self) -> None:
        if self._backend == "trio":
            await self._wait_trio()
        else:
            await self._wait_asyncio()

    async def _wait_asyncio(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not waiter.done():
                waiter.set_result(None)

        def wake() -> None:
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(resolve)

        if self._park(wake):
            await waiter

    async def _wait_trio(self) -> None:
        import trio

        token = trio.lowlevel.current_trio_token()
        parked = trio.Event()

        def wake() -> None:
            with suppress(trio.RunFinishedError):  # the run is over: nobody waits any more
                token.run_sync_soon(parked.set)

        if self._park(wake):
            await parked.wait()

    def _park(self, wake: Callable[[], None]) -> bool:
        """Register ``wake``; ``False`` if the gate is already open."""
        with self._lock:
            if self._opened:
                return False
            self._wake = wake
            return True


async def task_body(tracker: Tracker, task_id: int, kind: str, gate: Gate | None) -> int:
    """The coroutine every submitted task runs: its behaviour is chosen by ``kind``."""
    tracker.start(task_id)
    try:
        if kind in RAISES:
            raise RAISES[kind](task_id)
        if kind == "gated":
            assert gate is not None
            await gate.wait()
        elif kind == "sleep":
            await anyio.sleep(0.001)  # workload only: nothing waits for it to end
        else:
            await anyio.sleep(0)
        return expected(task_id)
    finally:
        tracker.finish(task_id)


def sync_body(tracker: Tracker, task_id: int) -> int:
    """A sync callable: it runs in the worker's loop thread."""
    tracker.start(task_id)
    try:
        return expected(task_id)
    finally:
        tracker.finish(task_id)


async def map_item(tracker: Tracker, task_id: int) -> int:
    tracker.start(task_id)
    try:
        await anyio.sleep(0.001 * (task_id % 3))  # workload only
        return expected(task_id)
    finally:
        tracker.finish(task_id)


def run_in_caller_loop(caller: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` in a fresh asyncio or trio loop on a helper thread; bounded."""
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            if caller == "trio":
                import trio

                outcome.append((True, trio.run(main)))
            else:
                outcome.append((True, asyncio.run(main())))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"stateful-caller-{caller}")
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"the {caller} caller of run_async hung"
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


class RecordingPool(PortalPool[None]):
    """A pool that keeps every future made by ``submit``: map's and run's too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.futures: list[Future[Any]] = []
        super().__init__(*args, **kwargs)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future


@dataclass
class Record:
    """A task submitted by a rule, and what the machine did to it."""

    task_id: int
    kind: str
    future: Future[Any]
    gate: Gate | None = None
    cancel_requested: bool = False


def no_pool_threads(prefix: str) -> list[str]:
    """Names of live threads that belong to the pool with this thread-name prefix."""
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


# -- the state machine --------------------------------------------------------------------


def pool_machine(backend_kwargs: dict[str, Any]) -> type[RuleBasedStateMachine]:
    """The machine class for one pool backend."""
    backend: str = backend_kwargs["backend"]

    class PoolMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.prefix = f"stateful-{uuid.uuid4().hex[:12]}"
            self._pool: RecordingPool | None = None
            self.tracker = Tracker()
            self.ids = itertools.count()
            self.records: list[Record] = []
            self.pinned: list[Future[Any]] = []  # futures made by Worker.submit
            # Ids that must never start: their future was cancelled while PENDING, or
            # a cancelled run_async caller returned before the task had started.
            self.never_start: set[int] = set()
            # The check as first stated: cancel() returned True while the id was not
            # yet in `started`. Maps the id to the state cancel() saw.
            self.not_started_at_cancel: dict[int, str] = {}
            self.run_async_total = 0
            self.run_async_known: Counter[str] = Counter()  # "completed" / "failed"
            self.run_async_unknown = 0  # caller cancelled: any of the three outcomes
            self.shut = False
            self.shut_waited = False
            self.cancel_shutdown = False
            self.cancel_at_end = False

        @property
        def pool(self) -> RecordingPool:
            assert self._pool is not None
            return self._pool

        def new_task(self) -> int:
            task_id = next(self.ids)
            self.tracker.expect(task_id)
            return task_id

        def all_futures(self) -> list[Future[Any]]:
            return [*self.pool.futures, *self.pinned]

        def open_all_gates(self) -> None:
            for record in self.records:
                if record.gate is not None:
                    record.gate.open()

        # -- rules -----------------------------------------------------------------------

        @initialize(workers=st.integers(1, 3), cancel_at_end=st.booleans())
        def start_pool(self, workers: int, cancel_at_end: bool) -> None:
            self._pool = RecordingPool(workers, thread_name_prefix=self.prefix, **backend_kwargs)
            self.cancel_at_end = cancel_at_end

        @precondition(lambda self: not self.shut)
        @rule(kind=st.sampled_from(SUBMIT_KINDS), pin=st.none() | st.integers(0, 2))
        def submit(self, kind: str, pin: int | None) -> None:
            task_id = self.new_task()
            gate = Gate(backend) if kind == "gated" else None
            if pin is None:
                submit: Callable[..., Future[Any]] = self.pool.submit
            else:
                submit = self.pool.workers[pin % len(self.pool.workers)].submit
            if kind == "sync":
                future = submit(sync_body, self.tracker, task_id)
            else:
                future = submit(task_body, self.tracker, task_id, kind, gate)
            if pin is not None:
                self.pinned.append(future)
            self.records.append(Record(task_id, kind, future, gate))

        @precondition(lambda self: self.records)
        @rule(pick=st.integers(0, 10**6), live=st.booleans())
        def cancel(self, pick: int, live: bool) -> None:
            # Half the time aim at unfinished work, where the interesting races are.
            unfinished = [r for r in self.records if not r.future.done()]
            records = unfinished if live and unfinished else self.records
            record = records[pick % len(records)]
            future = record.future
            # The state cancel() found, read after the call (see cancel_and_classify):
            # holding the future's lock around the call would not freeze it, as the cancel
            # would then be handed over until the lock is let go.
            before = cancel_and_classify(future)
            cancelled = before != FINISHED
            started_then = self.tracker.has_started(record.task_id)
            if before in (PENDING, RUNNING):
                # cancel() wins, even over a running task, and at once.
                assert cancelled
                assert future.cancelled()
                assert future.done()
            elif before == FINISHED:
                assert not cancelled
                assert not future.cancelled()
            else:
                assert before in (CANCELLED, CANCELLED_AND_NOTIFIED)
                assert cancelled
            if not cancelled:
                REACHED["cancel: already finished"] += 1
                return
            record.cancel_requested = True
            if before == PENDING:
                REACHED["cancel: pending"] += 1
                assert not started_then, "a PENDING future's task had already started"
                self.never_start.add(record.task_id)
            elif before == RUNNING:
                REACHED["cancel: running"] += 1
            if not started_then:
                self.not_started_at_cancel.setdefault(record.task_id, before)

        @precondition(lambda self: not self.cancel_shutdown)
        @rule(pick=st.integers(0, 10**6))
        def cancel_running(self, pick: int) -> None:
            """Deterministically cancel a task that is known to be running."""
            candidates = [
                record
                for record in self.records
                if record.gate is not None
                and not record.gate.opened
                and not record.cancel_requested
            ]
            if not candidates:
                return
            record = candidates[pick % len(candidates)]
            assert self.tracker.wait_started(record.task_id), "a queued task never started"
            assert record.future.running()
            assert record.future.cancel()
            assert record.future.cancelled()
            record.cancel_requested = True
            # The cancellation reaches the task in its loop, where its finally runs.
            assert self.tracker.wait_finished(record.task_id), "a cancelled task never ended"
            REACHED["cancel: known running"] += 1

        @rule(pick=st.integers(0, 10**6))
        def open_gate(self, pick: int) -> None:
            gated = [r for r in self.records if r.gate is not None and not r.gate.opened]
            if gated:
                gate = gated[pick % len(gated)].gate
                assert gate is not None
                gate.open()

        @precondition(lambda self: not self.shut)
        @rule(kind=st.sampled_from(["ok", "sync", "fail", "boom"]))
        def run_blocking(self, kind: str) -> None:
            task_id = self.new_task()
            if kind == "sync":
                assert self.pool.run(sync_body, self.tracker, task_id) == expected(task_id)
            elif kind == "ok":
                value = self.pool.run(task_body, self.tracker, task_id, kind, None)
                assert value == expected(task_id)
            else:
                with pytest.raises(RAISES[kind]) as raised:
                    self.pool.run(task_body, self.tracker, task_id, kind, None)
                assert raised.value.args == (task_id,)

        @precondition(lambda self: not self.shut)
        @rule(
            caller=st.sampled_from(CALLERS),
            kind=st.sampled_from(["ok", "sleep", "fail", "boom", "gated"]),
            timeout=st.sampled_from([None, 0.0, 0.001, 0.005]),
        )
        def run_async(self, caller: str, kind: str, timeout: float | None) -> None:
            if kind == "gated" and timeout is None:
                timeout = 0.005  # the gate never opens: only the caller's cancel ends it
            task_id = self.new_task()
            gate = Gate(backend) if kind == "gated" else None
            pool, tracker = self.pool, self.tracker

            async def call() -> tuple[str, Any, Any]:
                with anyio.move_on_after(math.inf if timeout is None else timeout):
                    try:
                        value = await pool.run_async(task_body, tracker, task_id, kind, gate)
                    except (ValueError, Boom) as exc:
                        return "raised", exc, None
                    return "value", value, None
                # Only reached when the scope swallowed the caller's cancellation.
                return "cancelled", tracker.has_started(task_id), tracker.has_finished(task_id)

            self.run_async_total += 1
            tag, first, second = run_in_caller_loop(caller, call)
            if tag == "cancelled":
                assert timeout is not None
                started, finished = first, second
                # run_async waits for the cancelled task to end before it returns.
                assert finished or not started, "run_async returned before its task ended"
                if not started:
                    self.never_start.add(task_id)
                self.run_async_unknown += 1
                REACHED[f"run_async: {caller} caller cancelled, task started={started}"] += 1
                return
            assert kind != "gated"
            if kind in RAISES:
                assert tag == "raised"
                assert type(first) is RAISES[kind]
                assert first.args == (task_id,)
                self.run_async_known["failed"] += 1
            else:
                assert tag == "value"
                assert first == expected(task_id)
                self.run_async_known["completed"] += 1
            REACHED[f"run_async: {caller} caller got the outcome"] += 1

        @precondition(lambda self: not self.shut)
        @rule(
            n=st.integers(1, 12),
            take=st.integers(0, 12),
            chunksize=st.sampled_from([1, 2, 3]),
            buffersize=st.sampled_from([None, 1, 2, 4]),
        )
        def map_abandoned(self, n: int, take: int, chunksize: int, buffersize: int | None) -> None:
            take = min(take, n)
            ids = [next(self.ids) for _ in range(n)]
            before = len(self.pool.futures)
            results = self.pool.map(
                map_item,
                itertools.repeat(self.tracker),
                ids,
                chunksize=chunksize,
                buffersize=buffersize,
            )
            taken = [next(results) for _ in range(take)]
            assert isinstance(results, Generator)
            results.close()  # leaving early cancels what is still outstanding
            assert taken == [expected(task_id) for task_id in ids[:take]]
            # Python 3.14's map semantics: the first window at once, then one more unit
            # before each unit of results is taken.
            units = math.ceil(n / chunksize)
            if buffersize is None:
                submitted = units
            else:
                submitted = min(units, buffersize + math.ceil(take / chunksize))
            assert len(self.pool.futures) - before == submitted
            REACHED["map: abandoned" if take < n else "map: consumed"] += 1

        @precondition(lambda self: not self.shut)
        @rule(wait=st.booleans(), cancel_futures=st.booleans())
        def shutdown(self, wait: bool, cancel_futures: bool) -> None:
            if wait and not cancel_futures:
                self.open_all_gates()  # else the shutdown would wait for them forever
            self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
            self.shut = True
            self.shut_waited = wait
            self.cancel_shutdown = cancel_futures
            if wait:
                # Nothing is left pending, and no thread outlives shutdown(wait=True).
                assert all(future.done() for future in self.all_futures())
                assert no_pool_threads(self.prefix) == []
            REACHED[f"shutdown: wait={wait} cancel_futures={cancel_futures}"] += 1

        @precondition(lambda self: self.shut)
        @rule(pin=st.none() | st.integers(0, 2))
        def submit_after_shutdown(self, pin: int | None) -> None:
            target = self.pool if pin is None else self.pool.workers[pin % len(self.pool.workers)]
            with pytest.raises(RuntimeError, match="after shutdown"):
                target.submit(sync_body, self.tracker, -1)

        @invariant()
        def cancel_wins(self) -> None:
            # Once cancel() returned True the future stays cancelled: the task's late
            # outcome never overwrites it.
            for record in self.records:
                if record.cancel_requested:
                    assert record.future.cancelled()

        # -- the end ---------------------------------------------------------------------

        def teardown(self) -> None:
            if self._pool is None:
                return
            try:
                self.finish_and_check()
            finally:
                self.pool.shutdown(wait=True, cancel_futures=True)  # never leave threads

        def finish_and_check(self) -> None:
            if not self.shut_waited:
                cancel = self.cancel_at_end
                if not (cancel or self.cancel_shutdown):
                    # A shutdown without cancellation waits for gated tasks: let them end.
                    self.open_all_gates()
                self.pool.shutdown(wait=True, cancel_futures=cancel)
                self.cancel_shutdown |= cancel
            futures = self.all_futures()
            _, not_done = wait(futures, timeout=TIMEOUT)
            assert not not_done, f"{len(not_done)} futures never resolved"
            assert no_pool_threads(self.prefix) == []
            self.check_outcomes()
            self.check_starts()
            self.check_statistics(futures)

        def check_outcomes(self) -> None:
            for record in self.records:
                future, task_id = record.future, record.task_id
                if future.cancelled():
                    assert record.cancel_requested or self.cancel_shutdown, (
                        f"task {task_id} ({record.kind}) was cancelled by nobody"
                    )
                    continue
                exc = future.exception(timeout=0)
                if record.kind in RAISES:
                    assert type(exc) is RAISES[record.kind]
                    assert exc.args == (task_id,)
                else:
                    assert exc is None
                    assert future.result(timeout=0) == expected(task_id)

        def check_starts(self) -> None:
            started, finished = self.tracker.snapshot()
            # shutdown(wait=True) waits for every task, including cancelled ones'
            # cleanup: whatever started has run its finally.
            assert started <= finished, f"started, never finished: {started - finished}"
            # Work cancelled while queued never starts, not even later.
            assert not (self.never_start & started), (
                f"tasks started after being cancelled while queued: {self.never_start & started}"
            )
            # The check "cancel() returned True and the id was not yet in `started`, so
            # it must never be added" is racy as stated: a task that the loop has
            # already moved to RUNNING records its id a moment later, in the same step.
            # Every such late start must come from a future that was RUNNING.
            for task_id, before in self.not_started_at_cancel.items():
                if task_id in started:
                    assert before == RUNNING, f"task {task_id} started after a {before} cancel"
                    REACHED["cancel: RUNNING, first line not yet run"] += 1
                    event("cancel() raced with the task's first line")

        def check_statistics(self, futures: list[Future[Any]]) -> None:
            cancelled = sum(1 for f in futures if f.cancelled())
            failed = sum(1 for f in futures if not f.cancelled() and f.exception(0) is not None)
            completed = len(futures) - cancelled - failed
            completed += self.run_async_known["completed"]
            failed += self.run_async_known["failed"]
            unknown = self.run_async_unknown
            stats = self.pool.stats()
            assert (stats.running, stats.queued, stats.pending) == (0, 0, 0)
            # Each future counted exactly once; a cancelled run_async caller's task may
            # have ended in any of the three ways.
            submitted = len(futures) + self.run_async_total
            assert stats.completed + stats.failed + stats.cancelled == submitted, stats
            assert completed <= stats.completed <= completed + unknown, stats
            assert failed <= stats.failed <= failed + unknown, stats
            assert cancelled <= stats.cancelled <= cancelled + unknown, stats

    PoolMachine.__name__ = PoolMachine.__qualname__ = f"PoolMachine_{backend}"
    return PoolMachine


def test_pool_state_machine(backend_kwargs: dict[str, Any]) -> None:
    run_state_machine_as_test(pool_machine(backend_kwargs), settings=SETTINGS)
    print(f"\ninterleavings reached so far: {dict(sorted(REACHED.items()))}")


# -- regressions: two bugs found at de1d155, fixed in ebe4639 ---------------------------------


def test_shutdown_cancel_counts_each_future_once(backend_kwargs: dict[str, Any]) -> None:
    # Was: on asyncio, a future cancelled while queued whose task was spawned and then
    # cancelled by shutdown(cancel_futures=True) before its first step went through
    # _task_exited() twice (cancel(), then AsyncioRuntime._task_done's
    # _settle_cancelled()): stats.cancelled was 20 here, and the max_pending count was
    # released twice.
    pool = PortalPool(1, **backend_kwargs)
    worker = pool.workers[0]

    async def queued() -> None:
        await anyio.sleep(0)

    try:
        with loop_held(worker.submit) as blocker:
            futures = [worker.submit(queued) for _ in range(10)]
            # Cancels the queued futures now; the loop gets the stop request once unblocked.
            pool.shutdown(wait=False, cancel_futures=True)
            assert all(future.cancelled() for future in futures)
    finally:
        pool.shutdown(wait=True)
    assert blocker.result(timeout=0) is None
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.cancelled) == (1, 0, 10)


def test_cancelled_chunk_leaves_no_unawaited_coroutine(backend_kwargs: dict[str, Any]) -> None:
    # Was: on asyncio, run_chunk_asyncio made every item's coroutine before gather(); a
    # chunk cancelled before gather's children took a step never awaited or closed them,
    # and each one warned "coroutine ... was never awaited" (an error under -W error).
    in_chunk = threading.Event()
    cancelled = threading.Event()

    async def item(n: int) -> int:
        return n

    def fn(n: int) -> Any:
        # Item 1 holds the chunk's first step until the test thread has cancelled it,
        # so the cancellation reaches the loop before gather's children first run.
        if n == 1:
            in_chunk.set()
            assert cancelled.wait(TIMEOUT)
            return n
        return item(n)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RecordingPool(1, **backend_kwargs) as pool:
            results = pool.map(fn, [0, 1], chunksize=2)
            assert in_chunk.wait(TIMEOUT)
            (chunk,) = pool.futures
            assert chunk.cancel()
            cancelled.set()
            _, not_done = wait([chunk], timeout=TIMEOUT)
            assert not not_done
            del results
        gc.collect()
    never_awaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == []
