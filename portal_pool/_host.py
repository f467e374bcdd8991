"""Where a worker's event loop lives: the interface between a worker and its host.

A :class:`~portal_pool.Worker` is the pool's handle on one event loop: its inbox,
admission, counters and statistics, and ``submit``/``run``/``run_async``. None of that
depends on where the loop runs. A *host* decides that: a thread of this process
(:class:`~portal_pool.ThreadHost`), a child process (:class:`~portal_pool.ProcessHost`),
or a Ray actor (:class:`~portal_pool.ray.RayHost`).
For each worker, the host makes one :class:`HostedLoop`, the small interface below, and
the loop side calls back on the worker to take its inbox, requeue work, and report that
it is ready or has exited.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ._flow import PendingLimit
    from ._future import TaskFuture


@dataclass(frozen=True)
class LoopSettings:
    """What every worker's loop is made from: the pool's arguments, checked."""

    backend: str
    backend_options: dict[str, Any]
    context_factory: Callable[[], AbstractAsyncContextManager[Any]] | None
    thread_name_prefix: str
    max_concurrency: int | None
    pending_limit: PendingLimit | None
    stall_timeout: float | None


class Waker(Protocol):
    """What a worker calls, under its lock, once per burst of submissions."""

    def wake(self) -> None:
        """Have the loop side take the inbox soon; from any thread, never waiting."""
        ...


class HostedLoop(Protocol):
    """One worker's event loop, wherever it lives.

    The worker calls these from any thread; none of them waits for the loop.
    """

    @property
    def pid(self) -> int:
        """The id of the process that runs the loop."""
        ...

    @property
    def node(self) -> str | None:
        """The id of the cluster node that runs the loop, on a host that has nodes."""
        ...

    @property
    def portal(self) -> BlockingPortal:
        """The loop's portal, where the caller can reach it.

        :raises RuntimeError: where the loop is not in this process, or not running
        """
        ...

    @property
    def context(self) -> Any:
        """The value ``worker_context`` yielded in that loop, if it is in this process."""
        ...

    def start(self) -> None:
        """Start the loop; the worker's ready future resolves or fails once it has."""
        ...

    def cancel(self, future: TaskFuture[Any]) -> None:
        """Cancel the running task of a future the loop took; it reports its exit."""
        ...

    def stop(self, cancel: bool) -> None:
        """Send the worker's recorded stop request to the loop, once or again."""
        ...

    def started(self) -> bool:
        """Whether :meth:`start` got as far as starting anything that must be joined."""
        ...

    def is_alive(self) -> bool:
        """Whether anything of the loop is still running."""
        ...

    def join(self) -> None:
        """Wait for what :meth:`start` started, once the worker's exited future is set."""
        ...

    def terminate(self) -> None:
        """End the loop now, without waiting for its tasks (a second Ctrl-C at exit)."""
        ...

    def check_heartbeat(self, now: float, stall_timeout: float) -> None:
        """Ping the loop, or report a ping left unanswered (the stall watchdog)."""
        ...

    def after_fork_in_child(self) -> list[TaskFuture[Any]]:
        """In a child made by ``os.fork()``: forget the loop; return the work it held."""
        ...


class Host(Protocol):
    """A place for workers' event loops, given to ``PortalPool(host=...)``."""

    @property
    def name(self) -> str:
        """``"thread"``, ``"process"`` or ``"ray"``."""
        ...

    def _default_max_workers(self) -> int:
        """How many workers ``PortalPool(max_workers=None)`` means on this host."""
        ...

    def _host_worker(self, worker: Any, settings: LoopSettings) -> HostedLoop:
        """Make the loop side of ``worker`` (a :class:`~portal_pool.Worker`), not started."""
        ...

    def _call_encoder(self) -> Callable[..., tuple[Any, ...]] | None:
        """How ``submit`` turns a call into what crosses to the loop; ``None``: as it is."""
        ...


def cpu_count() -> int:
    """The CPUs this process may use: the default number of workers on this machine."""
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return count or 1
