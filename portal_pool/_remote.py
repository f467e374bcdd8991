"""What every host whose loops live in another process shares, on the caller's side.

A remote worker's calls wait in this process until they are sent, and ``max_concurrency``
is a credit window here: at most that many sent calls are unsettled. The rest wait where
a worker's death cannot take them, free to cancel, and ``stats()`` stays exact. The
remote worker reports its own counts (restarts of its loop, stalls, loop lag) with its
outcomes; :class:`RemoteCounts` adds them to the local worker's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ._future import TaskFuture
    from ._worker import Worker


class _Link(Protocol):
    def _cancel_remote(self, call_id: int) -> None: ...


class RemoteCall:
    """A sent call's canceller: its id, for its link to send a cancellation."""

    __slots__ = ("_link", "id")

    def __init__(self, link: _Link, call_id: int) -> None:
        self._link = link
        self.id = call_id

    def cancel(self) -> None:
        self._link._cancel_remote(self.id)


def start_calls(
    link: _Link,
    worker: Worker[Any],
    waiting: deque[TaskFuture[Any]],
    in_flight: dict[int, TaskFuture[Any]],
    limit: int | None,
    ids: Iterator[int],
) -> list[tuple[int, bytes]]:
    """Turn waiting work into calls to send, as far as ``limit`` (max_concurrency) allows.

    Each one is marked running, with its id recorded in ``in_flight``, before it is sent:
    a ``cancel()`` that sees it running finds the id to send.

    :return: ``(id, encoded call)`` for each call to send, in order
    """
    calls: list[tuple[int, bytes]] = []
    while waiting and (limit is None or len(in_flight) < limit):
        future = waiting.popleft()
        if worker._cancelled_by_stop(future):
            continue
        call_id = next(ids)
        future._canceller = RemoteCall(link, call_id)
        call = future._begin()
        if call is None:  # cancelled while it waited
            future._canceller = None
            continue
        in_flight[call_id] = future
        calls.append((call_id, call[1][0]))
    worker._active = len(in_flight)
    return calls


class RemoteCounts:
    """The counts a remote worker last reported, to add only what is new to the worker's.

    A replacement starts counting from 0; the worker's own counts are kept.
    """

    __slots__ = ("_restarts", "_stalls")

    def __init__(self) -> None:
        self._restarts = 0
        self._stalls = 0

    def apply(self, worker: Worker[Any], status: tuple[int, int, float | None]) -> None:
        """Add a report of ``(restarts, stalls, loop_lag)`` to ``worker``'s counts."""
        restarts, stalls, worker._loop_lag = status
        worker._restarts += restarts - self._restarts
        worker._stalls += stalls - self._stalls
        self._restarts, self._stalls = restarts, stalls

    def reset(self) -> None:
        """The remote worker was replaced: its successor counts from 0."""
        self._restarts = self._stalls = 0


class RemoteLoop:
    """What the pool's end of every worker in another process has in common.

    One thread of this process (``_thread``) serves the worker: it sends the calls and
    settles the futures. The loop, its portal and the ``worker_context`` value are in the
    worker's own process, and so is its stall watchdog, whose reports come back with the
    outcomes.
    """

    _index: int
    _pid: int | None
    _thread: threading.Thread

    @property
    def portal(self) -> BlockingPortal:
        raise RuntimeError(self._lives_elsewhere("portal"))

    @property
    def context(self) -> Any:
        raise RuntimeError(self._lives_elsewhere("context"))

    def _lives_elsewhere(self, what: str) -> str:
        return (
            f"worker {self._index}'s {what} lives in its process (pid {self._pid}), not in "
            f"this one; read current_worker().{what} inside a task instead"
        )

    def start(self) -> None:
        self._thread.start()

    def cancel(self, future: TaskFuture[Any]) -> None:
        canceller = future._canceller
        if canceller is not None:
            canceller.cancel()  # a RemoteCall: its link sends the cancellation

    def started(self) -> bool:
        return self._thread.ident is not None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def check_heartbeat(self, now: float, stall_timeout: float) -> None:
        pass  # the worker's process runs its own watchdog
