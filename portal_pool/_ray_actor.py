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
import importlib
import os
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

# The worker's counts, sent with every answer: (restarts, stalls, loop_lag).
Status = tuple[int, int, float | None]


class WorkerActor:
    """One worker, in a Ray actor. Its methods are called by the pool's ``RayLoop`` only.

    ``call`` runs in Ray's default concurrency group; ``ready``, ``cancel``, ``watch`` and
    ``stop`` in a group of their own (``"control"``), so that a cancellation is never
    queued behind the calls it cancels. Ray does not order the two groups: a
    cancellation may come before its call, and is then kept until the call comes.
    """

    def __init__(self, config_blob: bytes) -> None:
        index, settings = settings_from_config(config_blob)
        self._worker: Worker[Any] = Worker(index, ThreadHost(), settings)
        self._calls: dict[int, TaskFuture[Any]] = {}
        self._early_cancels: set[int] = set()
        # Set (in Ray's loop) after each of the watchdog's checks; made in that loop.
        self._checked: asyncio.Event | None = None
        self._ray_loop: asyncio.AbstractEventLoop | None = None
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
        ray: Any = importlib.import_module("ray")
        # Outside an actor (the class is plain Python, and tested as such) no Ray runs:
        # asking would start one.
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return ("ready", os.getpid(), node)

    async def call(self, call_id: int, blob: bytes) -> tuple[Status, bytes | None]:
        """Run one encoded call; answer once its task has exited (``None``: cancelled)."""
        if call_id in self._early_cancels:
            self._early_cancels.discard(call_id)
            return self._status(), None
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
            return self._status(), encode_outcome(False, exc)
        try:
            await asyncio.shield(exited)
        except BaseException:
            future.cancel()  # Ray cancelled this method (ray.cancel, or the actor exits)
            raise
        finally:
            del self._calls[call_id]
        return self._status(), encoded_outcome(future)

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

    async def watch(self) -> Status:
        """Answer after the watchdog's next check, with the new status.

        The pool keeps one such call waiting: it answers the ``loop_lag`` of an idle
        worker, and fails at once if this actor dies, even with no call in flight.
        """
        checked = self._checked
        if checked is None:
            checked = self._checked = asyncio.Event()
        checked.clear()
        await checked.wait()
        return self._status()

    async def stop(self, cancel: bool) -> Status:
        """Stop the worker, with its tasks finished or cancelled; answer once it has ended."""
        self._worker._request_stop(cancel)
        await _until_done(self._worker._exited)
        if self._watchdog is not None:
            self._watchdog.stop(wait=False)
        return self._status()

    def _status(self) -> Status:
        worker = self._worker
        return worker._restarts, worker._stalls, worker._loop_lag

    def _after_check(self) -> None:
        loop, checked = self._ray_loop, self._checked
        if loop is not None and checked is not None:
            with suppress(RuntimeError):  # Ray's loop is closed: the actor is exiting
                loop.call_soon_threadsafe(checked.set)


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
