"""Map chunks: one task and one future serve many items, run concurrently in one loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from inspect import CORO_CREATED, getcoroutinestate, isawaitable, iscoroutine
from typing import TYPE_CHECKING, Any

from ._runtime import is_trio_cancellation

if TYPE_CHECKING:
    from ._future import Outcome


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
                if is_trio_cancellation(exc, trio.Cancelled):
                    raise
                outcomes[position] = (False, exc)

        async with trio.open_nursery() as nursery:
            for position, awaitable in awaitables:
                nursery.start_soon(settle, position, awaitable)
    return outcomes
