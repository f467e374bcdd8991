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
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from ._future import TaskFuture


class Runtime(Protocol):
    """What a worker needs from its backend, once its loop is running."""

    async def serve(self, on_ready: Callable[[], object]) -> None:
        """Open the task container, call ``on_ready``, run until stopped and joined."""

    def start(self, future: TaskFuture[Any]) -> None:
        """Start the future's call as a task; the future is already ``RUNNING``."""

    def request_stop(self, cancel: bool) -> None:
        """Let :meth:`serve` return once its tasks are done; ``cancel`` cancels them."""


async def _call_asyncio(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    # Every exception but cancellation becomes an outcome. asyncio re-raises
    # KeyboardInterrupt and SystemExit out of the loop itself, which would kill every
    # other task on this worker; here they go to the caller's future instead.
    try:
        value = fn(*args, **kwargs)
        if isawaitable(value):
            value = await value
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return False, exc
    return True, value


class AsyncioRuntime:
    """Tasks on an asyncio (or uvloop) loop, joined like a task group."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running: dict[asyncio.Task[tuple[bool, Any]], TaskFuture[Any]] = {}
        self._stop = asyncio.Event()
        self._idle: asyncio.Future[None] | None = None

    async def serve(self, on_ready: Callable[[], object]) -> None:
        on_ready()
        try:
            await self._stop.wait()
        finally:
            await self._join()

    def start(self, future: TaskFuture[Any]) -> None:
        task = self._loop.create_task(_call_asyncio(*future._take_call()))
        future._canceller = task.cancel
        self._running[task] = future
        task.add_done_callback(self._task_done)

    def request_stop(self, cancel: bool) -> None:
        self._stop.set()
        if cancel:
            for task in self._running:
                task.cancel()

    def _task_done(self, task: asyncio.Task[tuple[bool, Any]]) -> None:
        future = self._running.pop(task)
        if task.cancelled():
            future._settle_cancelled()
        else:
            future._settle(*task.result())
        if not self._running and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _join(self) -> None:
        cancelled: BaseException | None = None
        while self._running:
            self._idle = self._loop.create_future()
            try:
                await self._idle
            except asyncio.CancelledError as exc:
                # Our own task is being cancelled: cancel the children, but still wait
                # for them, as a task group would.
                cancelled = exc
                for task in self._running:
                    task.cancel()
        if cancelled is not None:
            raise cancelled


class TrioRuntime:
    """Tasks in a trio nursery, each in its own cancel scope."""

    def __init__(self) -> None:
        import trio

        self._trio = trio
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def serve(self, on_ready: Callable[[], object]) -> None:
        async with self._trio.open_nursery() as nursery:
            self._nursery = nursery
            on_ready()
            await self._stop.wait()

    def start(self, future: TaskFuture[Any]) -> None:
        assert self._nursery is not None
        # The scope exists before the task starts, so a cancel that arrives between
        # spawn and first step is not lost: entering a cancelled scope raises at once.
        scope = self._trio.CancelScope()
        future._canceller = scope.cancel
        self._nursery.start_soon(self._call, future, scope, *future._take_call())

    def request_stop(self, cancel: bool) -> None:
        self._stop.set()
        if cancel and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _call(
        self,
        future: TaskFuture[Any],
        scope: Any,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        outcome: tuple[bool, Any] | None = None
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


def make_runtime(backend: str) -> Runtime:
    return TrioRuntime() if backend == "trio" else AsyncioRuntime()


# -- map chunks: one task and one future serve many items --------------------------------

Outcome = tuple[bool, Any]


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
        # gather waits for every child even when cancelled, so none outlives the chunk.
        results = await asyncio.gather(
            *(_call_asyncio(_identity, (awaitable,), {}) for _, awaitable in awaitables)
        )
        for (position, _), outcome in zip(awaitables, results, strict=True):
            outcomes[position] = outcome
    return outcomes


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


def _identity(value: Any) -> Any:
    return value
