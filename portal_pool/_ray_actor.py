"""A Ray actor that runs one worker's event loop: the remote end of a ``RayLoop``.

Ray gives each async actor an asyncio loop of its own, which can run neither trio nor the
pool's own runtime. So the actor runs an ordinary thread-host worker beside it, on the
pool's backend, and Ray's loop only carries calls and outcomes across: each ``call``
queues the call in the worker, and answers when the call's task has exited.

This module imports no Ray at the top: the pool's process imports it without Ray, and
Ray makes it an actor class (see ``_ray_host``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from concurrent.futures import Future
from contextlib import suppress
from functools import partial
from typing import Any

from ._future import TaskFuture
from ._pickling import encode_outcome, run_encoded
from ._process_child import encoded_outcome, settings_from_config
from ._thread_host import ThreadHost
from ._watchdog import StallWatchdog
from ._worker import Worker

# The worker's counts, (restarts, stalls, loop_lag), and its log records since the last
# report, (level, text): sent with every answer.
Status = tuple[int, int, float | None]
Report = tuple[Status, list[tuple[int, str]]]


class WorkerActor:
    """One worker, in a Ray actor. Its methods are called by the pool's ``RayLoop`` only.

    ``call`` runs in Ray's default concurrency group; ``ready``, ``cancel``, ``watch`` and
    ``stop`` in a group of their own (``"control"``), so that a cancellation is never
    queued behind the calls it cancels. Ray does not order the two groups: a
    cancellation may come before its call, and is then kept until the call comes.
    """

    def __init__(self, config_blob: bytes, forward_logs: bool = True) -> None:
        index, settings = settings_from_config(config_blob)
        self._worker: Worker[Any] = Worker(index, ThreadHost(), settings)
        self._calls: dict[int, TaskFuture[Any]] = {}
        self._early_cancels: set[int] = set()
        # Set (in Ray's loop) after each of the watchdog's checks and each log record;
        # made in that loop.
        self._checked: asyncio.Event | None = None
        self._ray_loop: asyncio.AbstractEventLoop | None = None
        self._records: deque[tuple[int, str]] = deque()
        if forward_logs:
            _forward_logs(self)
        self._worker._start()
        self._watchdog: StallWatchdog | None = None
        if settings.stall_timeout is not None:
            self._watchdog = StallWatchdog(
                [self._worker],
                settings.stall_timeout,
                "portal_pool-watchdog",
                after_check=self._after_check,
            )
            self._watchdog.start()

    async def ready(self) -> tuple[Any, ...]:
        """``("ready", pid, node id)`` once the worker serves, or ``("failed", outcome)``."""
        self._ray_loop = asyncio.get_running_loop()
        if self._checked is None:
            self._checked = asyncio.Event()
        await _until_done(self._worker._ready)
        failure = self._worker._ready.exception()
        if failure is not None:
            return ("failed", encode_outcome(False, failure))
        # Outside an actor (the class is plain Python, and tested as such) Ray may not
        # run, or be installed: asking would start one.
        ray: Any = sys.modules.get("ray")
        node = ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
        return ("ready", os.getpid(), node)

    async def call(self, call_id: int, blob: bytes) -> tuple[Report, bytes | None]:
        """Run one encoded call; answer once its task has exited (``None``: cancelled)."""
        if call_id in self._early_cancels or self._worker._stop_request:
            # Cancelled before it came, or by a cancelling stop that overtook it: the
            # stop travels in the control group too.
            self._early_cancels.discard(call_id)
            return self._report(), None
        future: TaskFuture[Any] = TaskFuture(self._worker, run_encoded, (blob,), {})
        # Answered when the task has exited, not when its future is done: a cancelled
        # future is done at once, while the task's clean-up still runs, and the pool's
        # run_async, shutdown, stats and credit window wait for that clean-up.
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        future._on_task_exit = partial(_resolve_from_any_thread, loop, exited)
        self._calls[call_id] = future
        try:
            self._worker._enqueue(future)
        except BaseException as exc:  # the worker is broken: say so, per call
            del self._calls[call_id]
            return self._report(), encode_outcome(False, exc)
        try:
            await asyncio.shield(exited)
        except BaseException:
            future.cancel()  # Ray cancelled this method (ray.cancel, or the actor exits)
            raise
        finally:
            del self._calls[call_id]
        return self._report(), encoded_outcome(future)

    async def cancel(self, call_ids: list[int], settled_below: int) -> None:
        """Cancel calls, whether they have come yet or not.

        :param settled_below: every call with a lower id is settled in the pool, so it
            will not come (again): its early cancellation, if any, can go
        """
        self._early_cancels = {i for i in self._early_cancels if i >= settled_below}
        for call_id in call_ids:
            future = self._calls.get(call_id)
            if future is not None:
                future.cancel()
            else:  # not come yet, or over (its answer is on its way, and wins)
                self._early_cancels.add(call_id)

    async def watch(self) -> Report:
        """Answer after the watchdog's next check or the next log record, with the news.

        The pool keeps one such call waiting: it answers the ``loop_lag`` of an idle
        worker and its log records, and fails at once if this actor dies, even with no
        call in flight.
        """
        checked = self._checked
        if checked is None:
            checked = self._checked = asyncio.Event()
        checked.clear()
        if not self._records:
            await checked.wait()
        return self._report()

    async def stop(self, cancel: bool) -> Report:
        """Stop the worker, with its tasks finished or cancelled; answer once it has ended."""
        self._worker._request_stop(cancel)
        await _until_done(self._worker._exited)
        if self._watchdog is not None:
            self._watchdog.stop(wait=False)
        self._after_check()  # the waiting watch answers now, not at the actor's death
        return self._report()

    def _report(self) -> Report:
        records: list[tuple[int, str]] = []
        with suppress(IndexError):
            while True:
                records.append(self._records.popleft())
        worker = self._worker
        # Read after the records: the counts already include what they report.
        return (worker._restarts, worker._stalls, worker._loop_lag), records

    def _after_check(self) -> None:
        loop, checked = self._ray_loop, self._checked
        if loop is not None and checked is not None:
            with suppress(RuntimeError):  # Ray's loop is closed: the actor is exiting
                loop.call_soon_threadsafe(checked.set)


class _ForwardToPool(logging.Handler):
    """Keeps this process's ``portal_pool`` log records for the pool, as text."""

    def __init__(self, actor: WorkerActor) -> None:
        super().__init__()
        self._actor = actor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._actor._records.append((record.levelno, self.format(record)))
            self._actor._after_check()  # the waiting watch answers with it
        except Exception:
            self.handleError(record)


def _forward_logs(actor: WorkerActor) -> None:
    logger = logging.getLogger("portal_pool")
    logger.addHandler(_ForwardToPool(actor))
    logger.propagate = False  # the pool logs them: not a second time through Ray's stderr


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _resolve_from_any_thread(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
    with suppress(RuntimeError):  # Ray's loop is closed: the actor is exiting
        loop.call_soon_threadsafe(_resolve, waiter)


async def _until_done(future: Future[Any]) -> None:
    """Wait in Ray's loop for a future of the worker, whatever its outcome.

    Not ``asyncio.wrap_future``: a worker's failure may be a ``CancelledError`` (from a
    ``worker_context``), which that would turn into a cancellation of this coroutine.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    future.add_done_callback(lambda _: _resolve_from_any_thread(loop, waiter))
    await waiter
