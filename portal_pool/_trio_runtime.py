"""The trio runtime: calls in long-lived runner tasks of one nursery."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import suppress
from contextvars import copy_context
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from ._runtime import is_trio_cancellation

if TYPE_CHECKING:
    from ._future import Outcome, TaskFuture
    from ._runtime import Feeder

# How many idle runners a trio worker keeps parked for the next calls. Enough to absorb a
# burst without a spawn per call; more would only hold memory.
PARKED_RUNNERS_MAX = 64


class _Lead:
    """Handed to a parked runner: take over as the leader."""


_LEAD = _Lead()


class TrioRuntime:
    """Calls in long-lived *runner* tasks of one trio nursery.

    Why not one spawned task per call, woken through ``TrioToken.run_sync_soon``: that
    path costs two scheduler batches and a spawn per round trip (the entry-queue task
    runs first, the new task in the next batch). Instead one runner, the *leader*, waits
    on a socket that submitters write one byte to per burst. When the byte arrives the
    leader takes the whole inbox, hands every call but the first to a parked runner (or a
    new one), makes another runner the leader, and runs the first call itself, in the
    batch that woke it. A runner that has finished its call leads if nobody does, parks
    if fewer than :data:`PARKED_RUNNERS_MAX` are parked, and ends otherwise.

    A runner runs its calls inside one cancel scope of its own, which a call's future
    points to only while that call runs. Cancelling the call cancels the scope; the runner
    then takes a fresh one. Entering a trio cancel scope per call would cost about a
    fifth of a round trip.

    Each call starts in a fresh copy of the worker's context, as a spawned task would:
    a runner swaps its task's context before it waits for its next call (trio reads
    ``Task.context`` at every step), so nothing one call sets is seen by the next.
    """

    def __init__(self, feeder: Feeder) -> None:
        import outcome
        import trio

        self._trio = trio
        self._value = outcome.Value
        self._feeder = feeder
        self._stop = trio.Event()
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        # Every call starts in a copy of this; made inside worker_context, as on asyncio.
        self._base = copy_context()
        self._running: set[TaskFuture[Any]] = set()
        self._parked: list[trio.lowlevel.Task] = []
        self._leader: trio.lowlevel.Task | None = None
        # While the leader drains the inbox, start() keeps the first call for it.
        self._keeping = False
        self._kept: TaskFuture[Any] | None = None
        self._wake_receiver, self._wake_sender = socket.socketpair()
        self._wake_receiver.setblocking(False)
        self._wake_sender.setblocking(False)
        self.accepting = True

    def wake(self) -> None:
        # Full: a byte is already waiting, so the leader wakes anyway.
        with suppress(BlockingIOError):
            self._wake_sender.send(b"\0")

    def close(self) -> None:
        # Not at the end of serve(): the worker calls this under the lock that its
        # submitters hold while they call wake(), so no send can race the close and
        # land on a reused file descriptor.
        self._wake_receiver.close()
        self._wake_sender.close()

    async def serve(self, on_ready: Callable[[], object]) -> None:
        try:
            async with self._trio.open_nursery() as nursery:
                self._nursery = nursery
                self._spawn_runner(None)  # the first leader
                on_ready()
                try:
                    await self._stop.wait()
                except BaseException:
                    self.accepting = False  # cancelled from outside: the loop is dying
                    raise
        finally:
            self.accepting = False

    def start(self, future: TaskFuture[Any]) -> None:
        if self._keeping and self._kept is None:
            self._kept = future
        elif self._parked:
            self._trio.lowlevel.reschedule(self._parked.pop(), self._value(future))
        else:
            self._spawn_runner(future)

    def request_stop(self, cancel: bool) -> None:
        self._stopping = True
        self._stop.set()
        parked, self._parked = self._parked, []
        for task in parked:
            self._trio.lowlevel.reschedule(task, self._value(None))
        self.wake()  # the leader sees _stopping
        if cancel and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def unfinished(self) -> list[TaskFuture[Any]]:
        return list(self._running)

    def never_started(self) -> list[TaskFuture[Any]]:
        # A call handed to a runner is run, or requeued, at the runner's next step,
        # which trio runs even while the loop is dying.
        return []

    def _spawn_runner(self, future: TaskFuture[Any] | None) -> None:
        assert self._nursery is not None
        # start_soon copies the current context: make that the worker's.
        self._base.run(self._nursery.start_soon, self._runner, future)

    async def _runner(self, future: TaskFuture[Any] | None) -> None:
        task = self._trio.lowlevel.current_task()
        while True:
            with self._trio.CancelScope() as scope:
                serving = self._serve_calls(task, scope, future)
                # The call is _serve_calls' now. Held here too, its future (and so its
                # result) would live as long as this runner does.
                future = None
                await serving
                if not scope.cancel_called:
                    return
            # A call was cancelled (the scope caught it here, or at the next wait if the
            # call swallowed it): a cancelled scope stays cancelled, so take a fresh one.

    async def _serve_calls(self, task: Any, scope: Any, future: TaskFuture[Any] | None) -> None:
        while True:
            if future is not None:
                await self._run_call(future, scope)
                # Settled and handed over: kept while this runner waits, it would keep
                # the result alive after its caller has let go of it.
                future = None
            if self._stopping:
                return
            if self._leader is None:
                future = await self._lead(task)
            elif len(self._parked) < PARKED_RUNNERS_MAX:
                future = await self._park(task)
            else:
                return
            if future is None:
                return

    async def _lead(self, task: Any) -> TaskFuture[Any] | None:
        """Wait for submitters' wake-ups; return the first call of a burst, or ``None``."""
        self._leader = task
        try:
            while not self._stopping:
                task.context = self._base.copy()  # the step that wakes us runs the call
                await self._trio.lowlevel.wait_readable(self._wake_receiver)
                with suppress(BlockingIOError):
                    self._wake_receiver.recv(4096)
                self._keeping = True
                try:
                    self._feeder._drain()
                finally:
                    self._keeping = False
                future, self._kept = self._kept, None
                if future is not None:
                    # Someone must listen while we run the call.
                    self._leader = None
                    self._appoint_leader()
                    return future
            return None
        finally:
            if self._leader is task:
                self._leader = None

    def _appoint_leader(self) -> None:
        if self._parked:
            self._leader = self._parked.pop()
            self._trio.lowlevel.reschedule(self._leader, self._value(_LEAD))
        else:
            self._spawn_runner(None)

    async def _park(self, task: Any) -> TaskFuture[Any] | None:
        """Wait to be handed a call, or the leadership; return the call, or ``None`` to end."""
        task.context = self._base.copy()  # the next call starts fresh
        self._parked.append(task)

        def abort(_: object) -> Any:
            self._parked.remove(task)
            return self._trio.lowlevel.Abort.SUCCEEDED

        handed: TaskFuture[Any] | _Lead | None = await self._trio.lowlevel.wait_task_rescheduled(
            abort
        )
        if isinstance(handed, _Lead):
            return await self._lead(task)
        return handed

    async def _run_call(self, future: TaskFuture[Any], scope: Any) -> None:
        try:
            # As on asyncio: RUNNING only once the call runs, and a dying loop requeues.
            if not self.accepting:
                self._feeder._requeue(future)
                return
            if self._feeder._cancelled_by_stop(future):
                return
            # Set in this step, with RUNNING: a cancel() that sees RUNNING reaches the
            # loop later, through the token, and finds the runner's scope. Settling
            # clears it, so a cancel() that comes later cannot reach the next call.
            future._canceller = scope
            call = future._begin()
            if call is None:
                future._canceller = None
                return
            self._running.add(future)
            fn, args, kwargs = call
            outcome: Outcome | None = None
            try:
                try:
                    value = fn(*args, **kwargs)
                    if isawaitable(value):
                        value = await value
                except BaseException as exc:
                    if is_trio_cancellation(exc, self._trio.Cancelled):
                        raise
                    outcome = (False, exc)
                else:
                    outcome = (True, value)
            finally:
                self._running.discard(future)
                if outcome is None:
                    future._settle_cancelled()
                else:
                    future._settle(*outcome)
        finally:
            self._feeder._task_ended()
