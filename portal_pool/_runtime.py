"""The in-loop half of a worker: native task spawning for asyncio and for trio.

anyio's task group costs about five times a native spawn (see the benchmark), so inside
the worker's main task, which itself belongs to the portal's task group, each backend
keeps its tasks in its own structured container: a set of asyncio tasks that is joined
before the main task returns, or a trio nursery of runner tasks. Either way no task
outlives the portal.

Everything here runs in the worker's loop thread, except the runtimes' ``wake``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from contextvars import Context, copy_context
from inspect import CORO_CREATED, getcoroutinestate, isawaitable, iscoroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

from ._future import PENDING

if TYPE_CHECKING:
    from ._future import TaskFuture

Outcome = tuple[bool, Any]


class Host(Protocol):
    """The worker, as its runtime sees it."""

    def _requeue(self, future: TaskFuture[Any]) -> None:
        """Take back work that a dying loop never started."""
        ...

    def _task_ended(self) -> None:
        """A started task is over: its concurrency slot is free."""
        ...

    def _drain(self) -> None:
        """Take the inbox and start what it holds (in the loop thread)."""
        ...

    def _cancelled_by_stop(self, future: TaskFuture[Any]) -> bool:
        """At a call's first step: cancel it if a cancelling stop came first."""
        ...


class Runtime(Protocol):
    """What a worker needs from its backend, once its loop is running."""

    @property
    def accepting(self) -> bool:
        """False once the container is closing: a dying loop must not take new work."""
        ...

    def wake(self) -> None:
        """Have the loop drain the inbox soon; from any thread, never waiting."""
        ...

    def close(self) -> None:
        """Release what :meth:`wake` uses, once the loop has ended."""
        ...

    async def serve(self, on_ready: Callable[[], object]) -> None:
        """Open the task container, call ``on_ready``, run until stopped and joined."""
        ...

    def start(self, future: TaskFuture[Any]) -> None:
        """Spawn a task for the future; it turns ``RUNNING`` at the task's first step."""
        ...

    def request_stop(self, cancel: bool) -> None:
        """Let :meth:`serve` return once its tasks are done; ``cancel`` cancels them."""
        ...

    def unfinished(self) -> list[TaskFuture[Any]]:
        """Futures of tasks started here and not yet settled (after a loop died)."""
        ...

    def never_started(self) -> list[TaskFuture[Any]]:
        """Futures whose task was spawned but never ran (after a loop died)."""
        ...


if sys.version_info >= (3, 11):

    def _create_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], context: Context
    ) -> asyncio.Task[None]:
        return loop.create_task(coro, context=context)

else:

    def _create_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], context: Context
    ) -> asyncio.Task[None]:
        return context.run(loop.create_task, coro)  # no context= before 3.11


class AsyncioRuntime:
    """Tasks on an asyncio (or uvloop) loop, joined like a task group.

    Each task settles its own future and removes itself in its own ``finally``: no done
    callback, so finishing a task schedules nothing more on the loop.
    """

    def __init__(self, host: Host) -> None:
        self._loop = asyncio.get_running_loop()
        self._host = host
        # Every task starts in a copy of this. The worker makes its runtime inside
        # worker_context, so tasks see what that set.
        self._base = copy_context()
        # Every task spawned and not yet finished, by its future.
        self._tasks: dict[TaskFuture[Any], asyncio.Task[None]] = {}
        # Awaited by the worker's main task while it serves. Cancelling a task cancels
        # the future it awaits at once, so a dying loop (whose teardown cancels every
        # task before running queued callbacks) is visible here before any further
        # drain of the inbox runs; an asyncio.Event would not show it.
        self._serving: asyncio.Future[None] = self._loop.create_future()
        self._idle: asyncio.Future[None] | None = None
        self._joined = False
        self._cancelling = False

    @property
    def accepting(self) -> bool:
        return not (self._joined or self._serving.cancelled())

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._host._drain)
        except RuntimeError:
            if not self._loop.is_closed():
                raise
            # The loop has ended; its successor drains the inbox.

    def close(self) -> None:
        pass  # the loop's self-pipe is the loop's own

    async def serve(self, on_ready: Callable[[], object]) -> None:
        on_ready()
        try:
            await self._serving
        finally:
            await self._join()
            self._joined = True

    def start(self, future: TaskFuture[Any]) -> None:
        # Every task starts in a fresh copy of the worker's context, whoever submitted it.
        task = _create_task(self._loop, self._run(future), self._base.copy())
        # An eager task factory (3.12+) runs the task's first step inside create_task: a
        # task that finished there has already settled its future and left no trace.
        if not task.done():
            future._canceller = task
            self._tasks[future] = task

    def request_stop(self, cancel: bool) -> None:
        if not self._serving.done():
            self._serving.set_result(None)
        if cancel and not self._cancelling:  # a repeated stop cancels nothing twice
            # Tasks not started yet are cancelled at their first step (the host's
            # _cancelled_by_stop); cancelling them now would skip their cleanup entirely.
            self._cancelling = True
            for future, task in self._tasks.items():
                if future._started:
                    task.cancel()

    def unfinished(self) -> list[TaskFuture[Any]]:
        # Cancelled while running counts too: such a task has not reported its exit.
        return [future for future in self._tasks if future._started]

    def never_started(self) -> list[TaskFuture[Any]]:
        return [future for future in self._tasks if not future._started]

    async def _run(self, future: TaskFuture[Any]) -> None:
        # The future turns RUNNING here, in the task's first step, not at spawn, so
        # work whose task never ran can go back to the inbox when the loop dies.
        try:
            if not self.accepting:
                self._host._requeue(future)
                return
            if self._host._cancelled_by_stop(future):
                return
            call = future._begin()
            if call is None:
                return  # cancelled while it waited: cancel() has accounted for it
            if self._cancelling:
                # A call the worker took before the stop, starting after the stop has
                # cancelled the running tasks: cancelled as they were, at its first await.
                # (The current task: an eager one is not in self._tasks yet.)
                asyncio.current_task().cancel()  # type: ignore[union-attr]
            fn, args, kwargs = call
            # Every exception but cancellation goes to the future. asyncio re-raises
            # KeyboardInterrupt and SystemExit out of the loop itself, which would kill
            # every other task on this worker.
            try:
                value = fn(*args, **kwargs)
                if isawaitable(value):
                    value = await value
            except asyncio.CancelledError:
                future._settle_cancelled()
                raise
            except BaseException as exc:
                future._settle(False, exc)
            else:
                future._settle(True, value)
        finally:
            # Not there yet if an eager task factory ran this step inside start().
            self._tasks.pop(future, None)
            self._host._task_ended()
            if not self._tasks and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    async def _join(self) -> None:
        cancelled: BaseException | None = None
        while self._tasks:
            self._idle = self._loop.create_future()
            try:
                await self._idle
            except asyncio.CancelledError as exc:
                # Our own task is being cancelled: cancel the children, but still wait
                # for them, as a task group would. A task that never took its first
                # step never reaches its finally, so it is accounted for here.
                cancelled = exc
                for future, task in list(self._tasks.items()):
                    task.cancel()
                    if not future._started:
                        del self._tasks[future]
                        self._host._task_ended()
                        if future._state == PENDING:
                            self._host._requeue(future)
        if cancelled is not None:
            raise cancelled


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

    def __init__(self, host: Host) -> None:
        import outcome
        import trio

        self._trio = trio
        self._value = outcome.Value
        self._host = host
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
                    self._host._drain()
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
                self._host._requeue(future)
                return
            if self._host._cancelled_by_stop(future):
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
                    if _is_trio_cancellation(exc, self._trio.Cancelled):
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
            self._host._task_ended()


def _is_trio_cancellation(exc: BaseException, cancelled: type[BaseException]) -> bool:
    """True for ``Cancelled``, or a group of nothing but ``Cancelled`` from a nursery."""
    if isinstance(exc, cancelled):
        return True
    group: object = getattr(exc, "exceptions", None)
    if isinstance(group, tuple) and group:
        members = cast("tuple[BaseException, ...]", group)
        return all(_is_trio_cancellation(inner, cancelled) for inner in members)
    return False


def make_runtime(backend: str, host: Host) -> Runtime:
    """The runtime for ``backend``, serving the worker ``host``."""
    if backend == "trio":
        return TrioRuntime(host)
    return AsyncioRuntime(host)


# -- map chunks: one task and one future serve many items --------------------------------


def _start_calls(
    fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]
) -> tuple[list[Outcome | None], list[tuple[int, Awaitable[Any]]]]:
    """Call ``fn`` on every item; keep sync outcomes, return the awaitables to await."""
    outcomes: list[Outcome | None] = [None] * len(chunk)
    awaitables: list[tuple[int, Awaitable[Any]]] = []
    for position, args in enumerate(chunk):
        try:
            value = fn(*args)
        except BaseException as exc:
            outcomes[position] = (False, exc)
            continue
        if isawaitable(value):
            awaitables.append((position, value))
        else:
            outcomes[position] = (True, value)
    return outcomes, awaitables


async def run_chunk_asyncio(
    fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]
) -> list[Outcome | None]:
    """Run a chunk of calls concurrently; return one outcome per item, in order."""
    outcomes, awaitables = _start_calls(fn, chunk)
    if awaitables:
        await _ChunkJoin(outcomes, awaitables).run()
    return outcomes


class _ChunkJoin:
    """The children of one chunk: one task each, joined with a single counter.

    Cheaper than ``asyncio.gather``, which schedules one more callback per child when it
    finishes; here the last child to finish wakes the chunk. Structured like a task
    group: a cancelled chunk cancels its children and still waits for them.
    """

    def __init__(
        self, outcomes: list[Outcome | None], awaitables: list[tuple[int, Awaitable[Any]]]
    ) -> None:
        self._outcomes = outcomes
        self._awaitables = awaitables
        self._left = len(awaitables)
        self._all_done = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._settle(*item)) for item in self._awaitables]
        try:
            await self._all_done
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            # A child cancelled before its first step never runs its finally, so the
            # counter cannot tell: wait on the tasks themselves, however often we are
            # cancelled again meanwhile.
            while True:
                try:
                    await asyncio.wait(tasks)
                    break
                except asyncio.CancelledError:
                    continue
            # Such a child never awaited its coroutine: close it, or it warns "was
            # never awaited".
            for _, awaitable in self._awaitables:
                if iscoroutine(awaitable) and getcoroutinestate(awaitable) == CORO_CREATED:
                    awaitable.close()
            raise

    async def _settle(self, position: int, awaitable: Awaitable[Any]) -> None:
        try:
            self._outcomes[position] = (True, await awaitable)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # as in AsyncioRuntime._run: never out of the loop
            self._outcomes[position] = (False, exc)
        finally:
            self._left -= 1
            if not self._left and not self._all_done.done():
                self._all_done.set_result(None)


async def run_chunk_trio(
    fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]
) -> list[Outcome | None]:
    """Run a chunk of calls concurrently in a nursery; one outcome per item, in order."""
    import trio

    outcomes, awaitables = _start_calls(fn, chunk)
    if awaitables:

        async def settle(position: int, awaitable: Awaitable[Any]) -> None:
            try:
                outcomes[position] = (True, await awaitable)
            except BaseException as exc:
                if _is_trio_cancellation(exc, trio.Cancelled):
                    raise
                outcomes[position] = (False, exc)

        async with trio.open_nursery() as nursery:
            for position, awaitable in awaitables:
                nursery.start_soon(settle, position, awaitable)
    return outcomes
