"""The asyncio (and uvloop) runtime: one native task per call, joined like a task group."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from contextvars import Context, copy_context
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from ._future import PENDING

if TYPE_CHECKING:
    from ._future import TaskFuture
    from ._runtime import Feeder


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

    def __init__(self, feeder: Feeder) -> None:
        self._loop = asyncio.get_running_loop()
        self._feeder = feeder
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
            self._loop.call_soon_threadsafe(self._feeder._drain)
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
            # Tasks not started yet are cancelled at their first step (the feeder's
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
                self._feeder._requeue(future)
                return
            if self._feeder._cancelled_by_stop(future):
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
            del call  # a task that waits keeps its locals, and the collector walks them
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
            self._feeder._task_ended()
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
                        self._feeder._task_ended()
                        if future._state == PENDING:
                            self._feeder._requeue(future)
        if cancelled is not None:
            raise cancelled


# How many idle runners a trio worker keeps parked for the next calls. Enough to absorb a
