"""The trio runtime: calls in long-lived runner tasks of one nursery."""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Generator
from contextlib import suppress
from contextvars import Context, copy_context
from inspect import isawaitable
from types import CoroutineType, coroutine
from typing import TYPE_CHECKING, Any, cast

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
    leader takes the whole inbox and runs its calls itself, one after another, in the
    step that woke it, for as long as each finishes without waiting: a burst of calls
    that never wait costs one batch and no other task. The first call that waits makes
    the leader an ordinary runner: before that call's first suspension reaches trio, the
    rest of the burst goes to parked runners (or new ones) and another runner becomes
    the leader, so nothing queues behind a call that waits. A runner that has finished
    its call leads if nobody does, parks if fewer than :data:`PARKED_RUNNERS_MAX` are
    parked, and ends otherwise.

    A runner runs its calls inside one cancel scope of its own, which a call's future
    points to only while that call runs. Cancelling the call cancels the scope; the runner
    then takes a fresh one. Entering a trio cancel scope per call would cost about a
    fifth of a round trip.

    Each call starts in a fresh copy of the worker's context, as a spawned task would.
    """

    def __init__(self, feeder: Feeder) -> None:
        import outcome
        import trio

        self._trio = trio
        self._value = outcome.Value
        self._current_task = trio.lowlevel.current_task
        self._feeder = feeder
        self._stop = trio.Event()
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        # Every call starts in a copy of this; made inside worker_context, as on asyncio.
        self._base = copy_context()
        self._running: set[TaskFuture[Any]] = set()
        self._parked: list[trio.lowlevel.Task] = []
        self._leader: trio.lowlevel.Task | None = None
        # The calls of the burst the leader is running, or None when it runs none:
        # start() queues here meanwhile. Only ever touched inside the leader's step.
        self._burst: deque[TaskFuture[Any]] | None = None
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
        if self._burst is not None:
            self._burst.append(future)
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
        # which trio runs even while the loop is dying; a burst is handed on before
        # its leader lets trio run anything else.
        return []

    def _spawn_runner(self, future: TaskFuture[Any] | None) -> None:
        assert self._nursery is not None
        # start_soon copies the current context: make that the worker's.
        self._base.run(self._nursery.start_soon, self._runner, future)

    async def _runner(self, future: TaskFuture[Any] | None) -> None:
        task = self._current_task()
        while True:
            with self._trio.CancelScope() as scope:
                # One loop in this coroutine rather than a helper's: every runner waiting
                # on a call keeps its frames alive, and the garbage collector walks them.
                while True:
                    if future is not None:
                        # Taken out of `future`, and dropped once the call is over: a
                        # local that outlived the call would keep its future (and so its
                        # result) alive while this runner waits for the next one.
                        call, future = future, None
                        try:
                            await self._run_call(call, scope, None)
                        finally:
                            del call
                    if self._stopping:
                        return
                    if self._leader is None or self._leader is task:
                        await self._lead(task, scope)
                    elif len(self._parked) < PARKED_RUNNERS_MAX:
                        handed = await self._park(task)
                        if handed is None:
                            return
                        # None if we are to lead (see _stop_leading). Not kept in
                        # `handed`: a local that outlived the call would keep its
                        # future, and so its result, alive while this runner waits.
                        future = None if isinstance(handed, _Lead) else handed
                        del handed
                    else:
                        return
            # A call was cancelled (the scope caught it here, or at the next wait if the
            # call swallowed it): a cancelled scope stays cancelled, so take a fresh one.
            if not scope.cancel_called:
                return

    async def _lead(self, task: Any, scope: Any) -> None:
        """Wait for submitters' wake-ups and run each burst in the step that woke us;
        return once a call of ours had to wait (another runner leads by then) or stop."""
        self._leader = task
        try:
            while not self._stopping:
                await self._trio.lowlevel.wait_readable(self._wake_receiver)
                with suppress(BlockingIOError):
                    self._wake_receiver.recv(4096)
                burst = self._burst = deque()
                self._feeder._drain()
                # (The scope is not cancelled here: a call that swallowed its
                # cancellation had waited, so we no longer led when it ended, and a
                # cancelled scope makes wait_readable raise before we lead again.)
                while burst and self._leader is task:
                    await self._run_call(burst.popleft(), scope, task)
                if self._leader is not task:
                    return  # a call waited: we handed the burst on, and the lead
                self._hand_on_burst()
        finally:
            if self._leader is task:
                self._leader = None
                # Only if something failed inside the burst: the rest still runs.
                self._hand_on_burst()

    def _hand_on_burst(self) -> None:
        """Give what is left of the leader's burst to other runners; start() hands out
        from now on."""
        burst, self._burst = self._burst, None
        # Emptied, not just dropped: the leader's frame still holds this deque while
        # its call waits, and would keep these futures (and their results) alive.
        while burst:
            self.start(burst.popleft())

    def _stop_leading(self) -> None:
        """The leader's call is about to wait: pass on the burst and the lead."""
        self._leader = None
        self._hand_on_burst()
        if self._stopping:
            return  # nobody needs to listen any more
        if self._parked:
            self._leader = self._parked.pop()
            self._trio.lowlevel.reschedule(self._leader, self._value(_LEAD))
        else:
            self._spawn_runner(None)

    async def _park(self, task: Any) -> TaskFuture[Any] | _Lead | None:
        """Wait to be handed a call, or the lead; ``None`` means end."""
        task.context = self._base.copy()  # the next call starts fresh
        self._parked.append(task)

        def abort(_: object) -> Any:
            self._parked.remove(task)
            return self._trio.lowlevel.Abort.SUCCEEDED

        handed: TaskFuture[Any] | _Lead | None = await self._trio.lowlevel.wait_task_rescheduled(
            abort
        )
        return handed

    async def _run_call(self, future: TaskFuture[Any], scope: Any, leader: Any) -> None:
        """Run one call to its end; ``leader`` is our task if we lead, else ``None``."""
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
            del call  # a frame that waits keeps its locals, and the collector walks them
            outcome: Outcome | None = None
            try:
                try:
                    if leader is None:
                        # Our task's context is already a fresh copy (see _park).
                        value = fn(*args, **kwargs)
                        if isawaitable(value):
                            value = await value
                    else:
                        # Calls of one burst share a step, so each gets its own context.
                        context = self._base.copy()
                        value = context.run(fn, *args, **kwargs)
                        if type(value) is CoroutineType:
                            coro = cast("CoroutineType[Any, Any, Any]", value)  # type: ignore[redundant-cast]  # for pyright
                            value = await self._await_leading(coro, context, leader)
                        elif isawaitable(value):
                            # Not a coroutine: no first step to take here.
                            self._stop_leading()
                            leader.context = context
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

    @coroutine
    def _await_leading(
        self, coro: CoroutineType[Any, Any, Any], context: Context, task: Any
    ) -> Generator[Any, Any, Any]:
        """``await coro`` in the leader, handing on the lead at its first suspension.

        The first step runs here, in the call's context; if it finishes, the call never
        waited and the leader goes on with the burst. If it yields, what it yields is a
        trio trap for this task: before trio sees it, the burst and the lead go to
        other runners. From then on every step is passed through unchanged, as
        ``yield from`` would, in the call's context, which becomes the task's.
        """
        try:
            yielded = context.run(coro.send, None)
        except StopIteration as returned:
            return returned.value
        self._stop_leading()
        task.context = context
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # trio's Cancelled, or GeneratorExit on close
                try:
                    yielded = coro.throw(exc)
                except StopIteration as returned:
                    return returned.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as returned:
                    return returned.value
