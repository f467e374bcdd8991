"""The in-loop half of a worker: native task spawning for asyncio and for trio.

anyio's task group costs about five times a native spawn (see the benchmark), so inside
the worker's main task, which itself belongs to the portal's task group, each backend
keeps its tasks in its own structured container: a set of asyncio tasks that is joined
before the main task returns, or a trio nursery. Either way no task outlives the portal.

Everything here runs in the worker's loop thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


class Runtime(Protocol):
    """What a worker needs from its backend, once its loop is running."""

    @property
    def accepting(self) -> bool:
        """False once the container is closing: a dying loop must not take new work."""
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


class AsyncioRuntime:
    """Tasks on an asyncio (or uvloop) loop, joined like a task group.

    Each task settles its own future and removes itself in its own ``finally``: no done
    callback, so finishing a task schedules nothing more on the loop.
    """

    def __init__(self, host: Host) -> None:
        self._loop = asyncio.get_running_loop()
        self._host = host
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

    async def serve(self, on_ready: Callable[[], object]) -> None:
        on_ready()
        try:
            await self._serving
        finally:
            await self._join()
            self._joined = True

    def start(self, future: TaskFuture[Any]) -> None:
        task = self._loop.create_task(self._run(future))
        future._canceller = task
        self._tasks[future] = task

    def request_stop(self, cancel: bool) -> None:
        if not self._serving.done():
            self._serving.set_result(None)
        if cancel:
            # Tasks not started yet see the flag at their first step and never run
            # their call; cancelling them now would skip their cleanup entirely.
            self._cancelling = True
            for future, task in self._tasks.items():
                if future._started:
                    task.cancel()

    def unfinished(self) -> list[TaskFuture[Any]]:
        return [future for future in self._tasks if future.running()]

    def never_started(self) -> list[TaskFuture[Any]]:
        return [future for future in self._tasks if not future._started]

    async def _run(self, future: TaskFuture[Any]) -> None:
        # The future turns RUNNING here, in the task's first step, not at spawn, so
        # work whose task never ran can go back to the inbox when the loop dies.
        try:
            if not self.accepting:
                self._host._requeue(future)
                return
            if self._cancelling:
                future.cancel()  # shutdown(cancel_futures=True) came before this step
                return
            if not future.set_running_or_notify_cancel():
                return
            fn, args, kwargs = future._take_call()
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
            del self._tasks[future]
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


class TrioRuntime:
    """Tasks in a trio nursery, each in its own cancel scope."""

    def __init__(self, host: Host) -> None:
        import trio

        self._trio = trio
        self._host = host
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._running: set[TaskFuture[Any]] = set()
        self.accepting = True

    async def serve(self, on_ready: Callable[[], object]) -> None:
        try:
            async with self._trio.open_nursery() as nursery:
                self._nursery = nursery
                on_ready()
                try:
                    await self._stop.wait()
                except BaseException:
                    self.accepting = False  # cancelled from outside: the loop is dying
                    raise
        finally:
            self.accepting = False

    def start(self, future: TaskFuture[Any]) -> None:
        assert self._nursery is not None
        # The scope exists before the task starts, so a cancel that arrives between
        # spawn and first step is not lost: entering a cancelled scope raises at once.
        scope = self._trio.CancelScope()
        future._canceller = scope
        self._nursery.start_soon(self._call, future, scope)

    def request_stop(self, cancel: bool) -> None:
        self._stop.set()
        if cancel and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def unfinished(self) -> list[TaskFuture[Any]]:
        return [future for future in self._running if future.running()]

    def never_started(self) -> list[TaskFuture[Any]]:
        return []  # a trio task always runs its first step, which requeues if need be

    async def _call(self, future: TaskFuture[Any], scope: Any) -> None:
        try:
            await self._run_call(future, scope)
        finally:
            self._host._task_ended()

    async def _run_call(self, future: TaskFuture[Any], scope: Any) -> None:
        # As on asyncio: RUNNING only once the task runs, and a dying loop requeues.
        if not self.accepting:
            self._host._requeue(future)
            return
        assert self._nursery is not None
        if self._nursery.cancel_scope.cancel_called:
            future.cancel()  # shutdown(cancel_futures=True) came before its first step
            return
        if not future.set_running_or_notify_cancel():
            return
        self._running.add(future)
        fn, args, kwargs = future._take_call()
        outcome: Outcome | None = None
        try:
            with scope:
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
