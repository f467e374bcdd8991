"""Calls that re-enter the pool from inside the pool's own code, in the same thread.

Python runs a signal handler in the main thread between two bytecodes, and a ``__del__``
or weakref callback wherever an object is allocated or released: whatever line of the
pool a thread is running, a call back into the pool can land there, while that thread
holds one of the pool's locks (issue 10 item 9, and the "any lock a callback, signal
handler or ``__del__`` can re-enter" family).

A ``sys.settrace`` tracer makes that deterministic: it runs the handler at one chosen line
of the interrupted call, as Python would run a signal handler there. The sweeps choose, in
turn, every line the interrupted call runs in portal_pool, ``concurrent.futures`` and
``threading``, until the call runs to its end without reaching a new one. After each run
every future must have resolved, each done callback must have run exactly once, and
``stats()`` and the pending limit's count must be exact. A deadlock ends the test at its
timeout, with the stack.
"""

from __future__ import annotations

import concurrent.futures._base
import inspect
import linecache
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import portal_pool
from portal_pool import PortalPool
from portal_pool._flow import SHUTDOWN_MESSAGE
from portal_pool._worker import Worker

from .helpers import at_line, loop_held

MakePool = Callable[..., PortalPool[Any]]
Tracer = Callable[[FrameType, str, Any], Any]

TRACED_FILES = {
    *(str(path) for path in Path(portal_pool.__file__).parent.glob("*.py")),
    concurrent.futures._base.__file__,
    threading.__file__,
}
# Where the interrupted call is about to block, its locks released, as (function name,
# line, or None for any): a handler that has not run yet runs there (the last line the
# sweep needs), and must unblock it.
BLOCKING = {
    ("wait_in_slices", None),
    ("wait", "if timeout is None:"),  # threading.Condition's and the futures' condition's
    ("_wait", "waiter.acquire(True, SIGNAL_CHECK_INTERVAL)"),  # the pending limit's
}


def noop() -> None:
    pass


class LineInterrupt:
    """Runs ``handler`` once, at the first run of the ``target``-th distinct line.

    Lines count in the order this thread first runs them, in :data:`TRACED_FILES` only,
    and not while the handler itself runs.
    """

    def __init__(self, target: int, handler: Callable[[], None]) -> None:
        self._target = target
        self._handler = handler
        self._seen: set[tuple[str, int]] = set()
        self._busy = False
        self.fired_at: str | None = None
        self.fired_in: str | None = None
        self.blocked = False

    @contextmanager
    def armed(self) -> Iterator[None]:
        previous = sys.gettrace()
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(previous)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if self.fired_at is None and frame.f_code.co_filename in TRACED_FILES:
            return self._local
        return None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Tracer | None:
        if self.fired_at is not None:
            return None
        if event != "line" or self._busy:
            return self._local
        code = frame.f_code
        where = (code.co_filename, frame.f_lineno)
        new = where not in self._seen
        self._seen.add(where)
        blocking = _is_blocking(frame)
        if (new and len(self._seen) - 1 == self._target) or blocking:
            self.blocked = blocking
            self.fired_at = f"{Path(code.co_filename).name}:{frame.f_lineno} ({code.co_name})"
            self.fired_in = code.co_name
            self._busy = True
            try:
                self._handler()
            finally:
                self._busy = False
            return None
        return self._local


def _is_blocking(frame: FrameType) -> bool:
    code = frame.f_code
    if (code.co_name, None) in BLOCKING:
        return True
    line = linecache.getline(code.co_filename, frame.f_lineno).strip()
    return (code.co_name, line) in BLOCKING


@dataclass
class Run:
    """One run of a scenario: the pool, the futures to account for, what went wrong."""

    pool: PortalPool[Any]
    holder: Future[Any]
    target: Future[Any] | None = None
    other: Future[Any] | None = None
    futures: list[Future[Any]] = field(default_factory=list)
    callbacks: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def track(self, future: Future[Any]) -> Future[Any]:
        self.futures.append(future)
        self.callbacks[id(future)] = 0
        future.add_done_callback(self.count_callback)
        return future

    def count_callback(self, future: Future[Any]) -> None:
        self.callbacks[id(future)] += 1


def hostile_handler(run: Run, shutdown: str) -> Callable[[], None]:
    """What the signal handler does: every call a handler may make, in turn.

    It cancels two queued futures before it submits one, so that it never waits for
    room in a full pool, which a handler must not do.
    """

    def handler() -> None:
        queued = [run.target, run.other] if run.target is not None else [run.holder]
        for future in queued:
            if not future.cancel():
                run.errors.append("handler's cancel() of unfinished work returned False")
        try:
            run.track(run.pool.submit(noop))
        except RuntimeError as exc:  # the interrupted call may be a shutdown
            if str(exc) != SHUTDOWN_MESSAGE:
                run.errors.append(f"handler's submit: {exc!r}")
        run.pool.stats()
        if shutdown != "none":
            run.pool.shutdown(wait=False, cancel_futures=shutdown == "cancel_futures")

    return handler


# -- the interrupted calls: each may return a future, tracked once it has returned --------


def submit(run: Run) -> Future[Any] | None:
    try:
        return run.pool.submit(noop)
    except RuntimeError as exc:  # fine if the handler's shutdown came before the check
        if str(exc) != SHUTDOWN_MESSAGE:
            run.errors.append(f"interrupted submit: {exc!r}")
        return None


def shutdown(run: Run) -> None:
    run.pool.shutdown(wait=False, cancel_futures=True)


def cancel_other(run: Run) -> None:
    assert run.other is not None
    assert run.other.cancel()


def cancel_target(run: Run) -> None:
    assert run.target is not None
    assert run.target.cancel()


def result(run: Run) -> None:
    assert run.target is not None
    with pytest.raises(CancelledError):  # cancelled by the handler, whenever it lands
        run.target.result()


def wait_for_target(run: Run) -> None:
    assert run.target is not None
    done, _ = wait([run.target])
    assert done == {run.target}


def as_completed_target(run: Run) -> None:
    assert run.target is not None
    assert list(as_completed([run.target])) == [run.target]


def add_done_callback(run: Run) -> None:
    assert run.target is not None
    run.callbacks[id(run.target)] -= 1  # one more callback, counted by the same counter
    run.target.add_done_callback(run.count_callback)


def stats(run: Run) -> None:
    run.pool.stats()


@dataclass(frozen=True)
class Scenario:
    interrupted: Callable[[Run], Future[Any] | None]
    # The pool's options; whether two futures are queued behind the held loop first (a
    # first submit instead finds the loop's wake-up flag clear, and wakes it).
    pool_kwargs: dict[str, Any]
    queued: bool
    # At least one of these functions must be among the lines the sweep interrupted.
    sections: frozenset[str]


SCENARIOS = {
    "first_submit": Scenario(submit, {}, False, frozenset({"_enqueue"})),
    "submit": Scenario(submit, {}, True, frozenset({"_enqueue"})),
    "submit_limited": Scenario(submit, {"max_pending": 8}, True, frozenset({"acquire"})),
    # The holder and the two queued futures fill the pool: the submit waits for room.
    "submit_full": Scenario(submit, {"max_pending": 3}, True, frozenset({"acquire"})),
    "shutdown": Scenario(
        shutdown,
        {"max_pending": 8, "stall_timeout": 60},
        True,
        frozenset({"_begin_shutdown", "_request_stop", "close", "stop"}),
    ),
    "cancel_limited": Scenario(
        cancel_other, {"max_pending": 8}, True, frozenset({"_record_exit", "release"})
    ),
    "cancel_same": Scenario(cancel_target, {}, True, frozenset({"_transition_to_cancelled"})),
    "result": Scenario(result, {}, True, frozenset({"result"})),
    "wait": Scenario(wait_for_target, {}, True, frozenset({"wait"})),
    "as_completed": Scenario(as_completed_target, {}, True, frozenset({"as_completed"})),
    "add_done_callback": Scenario(add_done_callback, {}, True, frozenset({"add_done_callback"})),
    "stats": Scenario(stats, {}, True, frozenset({"_statistics"})),
}


def run_once(make_pool: MakePool, scenario: Scenario, shutdown: str, target: int) -> LineInterrupt:
    pool = make_pool(1, **scenario.pool_kwargs)
    with loop_held(pool.submit) as holder:
        run = Run(pool, holder)
        run.track(holder)
        if scenario.queued:
            run.target = run.track(pool.submit(noop))
            run.other = run.track(pool.submit(noop))
        interrupt = LineInterrupt(target, hostile_handler(run, shutdown))
        with interrupt.armed():
            returned = scenario.interrupted(run)
        if returned is not None:
            run.track(returned)
    pool.shutdown(wait=True)
    where = f"handler at {interrupt.fired_at}" if interrupt.fired_at else "no handler"
    assert not run.errors, f"{where}: {run.errors}"
    check_accounting(pool, run, where)
    return interrupt


def check_accounting(pool: PortalPool[Any], run: Run, where: str) -> None:
    """Every future resolved, its callbacks ran once, and the counters agree with them."""
    assert all(future.done() for future in run.futures), where
    assert set(run.callbacks.values()) == {1}, f"{where}: done callbacks {run.callbacks}"
    cancelled = sum(future.cancelled() for future in run.futures)
    failed = sum(not f.cancelled() and f.exception() is not None for f in run.futures)
    stats = pool.stats()
    assert stats.pending == 0, f"{where}: {stats}"
    assert (stats.completed, stats.failed, stats.cancelled) == (
        len(run.futures) - cancelled - failed,
        failed,
        cancelled,
    ), f"{where}: {stats}"
    limit = pool._pending_limit
    assert limit is None or limit.count == 0, f"{where}: the limit counts {limit.count}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shutdown", ["none", "wait_false", "cancel_futures"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_handler_at_any_line_neither_deadlocks_nor_corrupts(
    make_pool: MakePool, name: str, shutdown: str
) -> None:
    """The sweep: the handler submits, cancels, reads stats() and shuts down (or not)."""
    scenario = SCENARIOS[name]
    interrupted: list[str] = []
    target = 0
    while True:
        interrupt = run_once(make_pool, scenario, shutdown, target)
        if interrupt.fired_at is None:
            break  # the call ran to its end before reaching another new line
        interrupted.append(interrupt.fired_in or "")
        if interrupt.blocked:
            break
        target += 1
    assert scenario.sections & set(interrupted), f"never interrupted in {scenario.sections}"


# -- a real signal, at one chosen line of the submit ----------------------------------------


def line_of(function: Callable[..., Any], text: str) -> int:
    """The number of the line of ``function``'s source that contains ``text``."""
    lines, start = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(f"no line with {text!r} in {function.__qualname__}")


@contextmanager
def signal_at(
    function: Callable[..., Any], text: str, handler: Callable[[], None]
) -> Iterator[list[int]]:
    """Raise SIGUSR1, handled by ``handler``, when this thread reaches that line.

    Python runs the handler before ``raise_signal`` returns, as it would have at the
    next bytecode had the signal come from outside. Yields the signals raised so far.
    """
    code = function.__code__
    line = line_of(function, text)
    raised: list[int] = []

    def local(frame: FrameType, event: str, arg: Any) -> Tracer:
        if event == "line" and frame.f_lineno == line and not raised:
            raised.append(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Tracer | None:
        return local if frame.f_code is code else None

    previous_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: handler())
    previous_trace = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield raised
    finally:
        sys.settrace(previous_trace)
        signal.signal(signal.SIGUSR1, previous_handler)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("call", ["submit", "shutdown", "cancel"])
def test_a_signal_inside_submit_holding_the_worker_lock(make_pool: MakePool, call: str) -> None:
    """Issue 10 item 9: the handler submits, shuts down or cancels, mid-submit."""
    pool = make_pool(1)
    with loop_held(pool.submit) as holder:
        run = Run(pool, holder)
        run.track(holder)
        queued = run.track(pool.submit(noop))

        def handler() -> None:
            if call == "submit":
                run.track(pool.submit(noop))
            elif call == "shutdown":
                pool.shutdown(wait=False)
            else:
                assert queued.cancel()

        # Past the closed check, with the worker's lock held.
        with signal_at(Worker._enqueue, "self._inbox.append(future)", handler) as raised:
            interrupted = run.track(pool.submit(noop))
        assert raised == [signal.SIGUSR1]
        if call == "shutdown":
            with pytest.raises(RuntimeError, match="after shutdown"):
                pool.submit(noop)
    pool.shutdown(wait=True)
    assert interrupted.result() is None  # accepted before the shutdown: it ran
    assert queued.cancelled() == (call == "cancel")
    check_accounting(pool, run, f"handler calling {call}")


# -- a finalizer: the collector runs the pool's own, inside the worker's lock ----------------

FINALIZER_SCRIPT = """
import faulthandler, gc, inspect, sys
faulthandler.dump_traceback_later(10, exit=True)  # a hang shows its stacks, then exits
from portal_pool import PortalPool
from portal_pool._worker import Worker
backend, options, where = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
gc.disable()  # the one collection is the tracer's

def noop():
    pass

function, text = {
    "main": (Worker._enqueue, "self._inbox.append(future)"),
    "loop": (Worker._take_inbox, "batch, self._inbox = self._inbox, deque()"),
}[where]
lines, start = inspect.getsourcelines(function)
line = start + next(i for i, source in enumerate(lines) if text in source)
collected = []
dropped = []  # a drain before the pool is dropped (a wake-up left over) must not count

def local(frame, event, arg):
    if event == "line" and frame.f_lineno == line and dropped and not collected:
        collected.append(gc.collect())  # runs the pool's finalizer, which stops it
    return local

def tracer(frame, event, arg):
    return local if frame.f_code is function.__code__ else None

pool = PortalPool(1, backend=backend, backend_options=options)
pool.cycle = pool  # unreachable once dropped, except through this cycle
worker = pool.workers[0]
if where == "main":
    sys.settrace(tracer)
else:
    worker.submit(sys.settrace, tracer).result()  # traces the loop thread
del pool
dropped.append(True)
future = worker.submit(noop)  # "main": interrupted here; "loop": its drain is
sys.settrace(None)
print(future.result(timeout=5), collected[0] > 0)
worker._host_loop._thread.join(5)
print("stopped", not worker._host_loop._thread.is_alive())
try:
    worker.submit(noop)
except RuntimeError as exc:
    print(exc)
stats = worker._statistics()
print(stats.completed, stats.queued, stats.running)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["main", "loop"])
def test_the_pools_finalizer_inside_the_worker_lock(
    backend_kwargs: dict[str, Any], where: str
) -> None:
    """A pool collected while its worker's lock is held: in a submit, or in the drain.

    The collector runs finalizers in whatever thread it happens to run, at an
    allocation; the pool's finalizer stops its workers, which takes their locks.
    A subprocess, since a deadlocked worker thread would also hang this one's exit.
    """
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            FINALIZER_SCRIPT,
            str(backend_kwargs["backend"]),
            repr(backend_kwargs["backend_options"]),
            where,
        ],
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines() == [
        "None True",
        "stopped True",
        SHUTDOWN_MESSAGE,
        "2 0 0" if where == "loop" else "1 0 0",
    ]
    assert process.stderr == ""


# A cancel() from the thread holding the future's lock is handed over: it returns True, and
# runs once that thread lets go. The tests below hold that gap open (a tracer waits at the
# first line of the hand-over) while the loop's thread, which was waiting for the lock,
# goes on: without the GIL it gets there first. The future must still end cancelled, as
# cancel() said.
# The line of FutureCondition._run_handed_over that runs the handed-over cancel: the
# tests below hold this thread there, the lock already let go of, until the loop thread
# has settled the future.
HANDED_OVER = "call()"


def test_a_handed_over_cancel_of_queued_work_is_not_overtaken(make_pool: MakePool) -> None:
    pool = make_pool(1)
    worker = pool.workers[0]
    holding, release = threading.Event(), threading.Event()
    ran: list[bool] = []

    def hold() -> None:
        holding.set()
        assert release.wait(10)

    worker.submit(hold)
    assert holding.wait(10)
    future = worker.submit(ran.append, True)  # a sync call: it would end in one step
    after = worker.submit(noop)  # its end means the loop is past `future`'s start

    held: list[bool] = []

    def hold_the_gap_open() -> None:
        # The lock is free and the cancel not run yet: the loop goes on to `future`
        # (the loop thread was held, so this thread runs the hand-over).
        held.append(True)
        release.set()
        assert after.result(timeout=10) is None

    sys.settrace(at_line("_run_handed_over", HANDED_OVER, hold_the_gap_open))
    try:
        with future._condition:  # type: ignore[attr-defined]
            assert future.cancel()  # handed over: the future is still pending
    finally:
        sys.settrace(None)
    assert held == [True], "the tracer never reached the line it holds: was it renamed?"
    assert future.cancelled()
    assert ran == []
    pool.shutdown()
    stats = pool.stats()
    assert (stats.completed, stats.cancelled) == (2, 1)


def test_a_handed_over_cancel_of_running_work_is_not_overtaken(make_pool: MakePool) -> None:
    pool = make_pool(1)
    running, release = threading.Event(), threading.Event()

    def call() -> str:
        running.set()
        assert release.wait(10)
        return "finished"

    future = pool.submit(call)
    assert running.wait(10)

    held: list[bool] = []

    def hold_the_gap_open() -> None:
        # The lock is free and the cancel not run yet: the call returns, and the loop
        # settles it meanwhile. Waited for without the future's lock, whose release
        # here would run the hand-over.
        held.append(True)
        release.set()
        deadline = time.monotonic() + 10
        while future._state in ("PENDING", "RUNNING") and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.001)

    sys.settrace(at_line("_run_handed_over", HANDED_OVER, hold_the_gap_open))
    try:
        with future._condition:  # type: ignore[attr-defined]
            assert future.cancel()  # handed over: the call still runs
    finally:
        sys.settrace(None)
    assert held == [True], "the tracer never reached the line it holds: was it renamed?"
    assert future.cancelled()
    pool.shutdown()
    stats = pool.stats()
    assert (stats.completed, stats.cancelled) == (0, 1)
