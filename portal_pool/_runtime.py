"""What a worker's loop-side code needs from its backend: the runtime protocols.

anyio's task group costs about five times a native spawn (see the benchmark), so inside
the worker's main task, which itself belongs to the portal's task group, each backend
keeps its tasks in its own structured container: a set of asyncio tasks that is joined
before the main task returns (``_asyncio_runtime``), or a trio nursery of runner tasks
(``_trio_runtime``). Either way no task outlives the portal.

Everything a runtime does runs in the worker's loop thread, except its ``wake``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from ._future import TaskFuture


class Feeder(Protocol):
    """The loop side of a worker, as its runtime sees it."""

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


def is_trio_cancellation(exc: BaseException, cancelled: type[BaseException]) -> bool:
    """True for ``Cancelled``, or a group of nothing but ``Cancelled`` from a nursery."""
    if isinstance(exc, cancelled):
        return True
    group: object = getattr(exc, "exceptions", None)
    if isinstance(group, tuple) and group:
        members = cast("tuple[BaseException, ...]", group)
        return all(is_trio_cancellation(inner, cancelled) for inner in members)
    return False
