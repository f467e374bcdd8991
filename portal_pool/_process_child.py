"""A worker process: an ordinary thread-host worker, fed through a pipe from the parent.

The main thread reads the parent's messages and submits, cancels and stops; a writer
thread sends outcomes back in bursts, so a large result never stalls the loop, and
the loop thread is the thread host's own. The parent's end of the pipe closing (the
parent died, even by SIGKILL) stops the worker with its work cancelled, and the process
exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import threading
from collections import deque
from concurrent.futures import Future, wait
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, cast

from ._future import TaskFuture
from ._host import LoopSettings
from ._pickling import decode_call, encode_call, encode_outcome, run_encoded
from ._thread_host import ThreadHost, ThreadLoop
from ._tokens import call_soon_or_drop
from ._watchdog import StallWatchdog
from ._worker import Worker

# How long the work of a child whose parent is gone gets to end its clean-up.
_ORPHAN_GRACE = 1.5

# A message up to this size is sent by the loop thread itself: the pipe's buffer holds
# it, so the send does not block the loop. A bigger one goes to the writer thread.
_DIRECT_SEND_MAX = 64 * 1024


def child_config(index: int, settings: LoopSettings) -> bytes:
    """What a child needs to make its worker, pickled once per worker (in the parent).

    :raises TypeError: if a setting cannot be pickled, a ``worker_context`` say
    """
    config = {
        "index": index,
        "backend": settings.backend,
        "backend_options": settings.backend_options,
        "context_factory": settings.context_factory,
        "thread_name_prefix": settings.thread_name_prefix,
        "stall_timeout": settings.stall_timeout,
    }
    try:
        # dict(**config), when the child unpickles and calls it.
        return encode_call(dict, (), config)
    except TypeError as exc:
        raise TypeError(f"the pool's settings cannot be sent to a worker process: {exc}") from exc


def settings_from_config(config_blob: bytes) -> tuple[int, LoopSettings]:
    """The worker's index and loop settings, from what :func:`child_config` made."""
    make_config, args, kwargs = decode_call(config_blob)
    config: dict[str, Any] = make_config(*args, **kwargs)
    settings = LoopSettings(
        backend=config["backend"],
        backend_options=config["backend_options"],
        context_factory=config["context_factory"],
        thread_name_prefix=config["thread_name_prefix"],
        max_concurrency=None,  # the parent sends no more than that
        pending_limit=None,  # the parent admits the work
        stall_timeout=config["stall_timeout"],
    )
    return config["index"], settings


def child_main(connection: Connection, config_blob: bytes) -> None:
    """The worker process's entry point (the target of its ``multiprocessing.Process``)."""
    # First: a Ctrl-C in the terminal reaches the whole process group, and it is the
    # parent's to handle, by cancelling the work here. trio and asyncio install their
    # own SIGINT handler only over the default one, so they leave this alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    index, settings = settings_from_config(config_blob)
    worker: Worker[Any] = Worker(index, ThreadHost(), settings)
    outbox = _Outbox(connection, worker)
    _forward_logs(outbox)
    worker._ready.add_done_callback(partial(_report_ready, outbox))
    # After every task's outcome: the loop has settled them all when it exits.
    worker._exited.add_done_callback(lambda _: outbox.close())
    worker._start()
    watchdog = None
    if settings.stall_timeout is not None:
        # After each check, a message: the status in it gives the parent the new
        # loop_lag even while nothing else comes (an idle or a stalled loop).
        watchdog = StallWatchdog(
            [worker],
            settings.stall_timeout,
            "portal_pool-watchdog",
            after_check=partial(outbox.put, ("heartbeat",)),
        )
        watchdog.start()
    try:
        _read(connection, worker, outbox)
    finally:
        if not worker._exited.done():
            # The parent is gone without a stop: nobody will collect the work.
            worker._request_stop(True)
            if wait((worker._exited,), _ORPHAN_GRACE).not_done:
                os._exit(1)  # a task that ignores cancellation must not keep us alive
        if watchdog is not None:
            watchdog.stop(wait=True)
        outbox.join()


def _read(connection: Connection, worker: Worker[Any], outbox: _Outbox) -> None:
    """Act on the parent's messages until its end of the pipe closes."""
    futures: dict[int, Future[Any]] = {}
    while True:
        try:
            kind, payload = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            return
        if kind == "calls":
            for call_id, blob in payload:
                # Reported when its task has exited, not when its future is done: a
                # cancelled future is done at once, while the task's clean-up still
                # runs, and the parent's run_async, shutdown, stats and credit window
                # wait for that clean-up.
                future: TaskFuture[Any] = TaskFuture(worker, run_encoded, (blob,), {})
                future._on_task_exit = partial(_report_done, outbox, futures, call_id, future)
                futures[call_id] = future
                try:
                    worker._enqueue(future)
                except BaseException as exc:  # the worker is broken: say so, per call
                    del futures[call_id]
                    outbox.put(("done", call_id, encode_outcome(False, exc)))
        elif kind == "cancel":
            for call_id in payload:
                running = futures.get(call_id)
                if running is not None:  # else it is over, and its outcome on its way
                    running.cancel()
        else:  # "stop", with its cancel flag
            worker._request_stop(payload)


def _report_ready(outbox: _Outbox, ready: Future[None]) -> None:
    failure = ready.exception()
    if failure is None:
        outbox.put(("ready", os.getpid()))
    else:
        outbox.put(("failed", encode_outcome(False, failure)))


def _report_done(
    outbox: _Outbox, futures: dict[int, Future[Any]], call_id: int, future: Future[Any]
) -> None:
    futures.pop(call_id, None)
    # The last call in flight: no burst to wait for, so no reason to wait a loop turn.
    outbox.put_outcome(call_id, future, alone=not futures)


class _Outbox:
    """Events for the parent, in order, sent in bursts: one message per burst.

    Outcomes settled in the loop thread are sent once per burst, by one callback that
    the first of them schedules in the loop: no thread hop on the way back, and a
    burst of results costs one message. A message too big for the pipe's buffer goes
    to a writer thread instead, so a large result never blocks the loop. Other threads
    (the reader, the watchdog, logging) send at once.
    """

    def __init__(self, connection: Connection, worker: Worker[Any]) -> None:
        self._connection = connection
        self._worker = worker
        self._thread_loop = cast("ThreadLoop", worker._host_loop)
        self._events: deque[tuple[Any, ...]] = deque()
        # One sender at a time, whole messages; the writer releases it after its send.
        self._send_lock = threading.Lock()
        # The loop token that a flush is scheduled on: a replaced loop has a new token,
        # so a flush lost with the old loop cannot hold outcomes back.
        self._scheduled_on: object = None
        self._big: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_big, name="portal_pool-writer")
        self._writer.start()

    def put(self, event: tuple[Any, ...]) -> None:
        """Send ``event`` now (with whatever else is waiting); from any thread."""
        self._events.append(event)
        self._flush(blocking=True)

    def put_outcome(self, call_id: int, future: Future[Any], alone: bool) -> None:
        """Send a settled call's outcome: at once if it is ``alone`` in flight, else at
        the end of the loop's burst (if settled in the loop)."""
        self._events.append(("future", call_id, future))
        token = self._thread_loop._token
        if token is None or threading.get_ident() != self._worker._thread_ident:
            self._flush(blocking=True)  # settled outside the loop (a dying loop's work)
        elif alone:
            self._flush(blocking=False)
        elif self._scheduled_on is not token:
            self._scheduled_on = token
            if not call_soon_or_drop(token, self._flush_burst):
                self._scheduled_on = None
                self._flush(blocking=True)

    def close(self) -> None:
        """Say goodbye after everything else: the worker has ended."""
        self.put(("bye",))
        self._big.put(None)

    def join(self) -> None:
        self._writer.join()

    def _flush_burst(self) -> None:
        self._scheduled_on = None
        self._flush(blocking=False)

    def _flush(self, blocking: bool) -> None:
        while self._events:
            if not self._send_lock.acquire(blocking):
                return  # its holder sends what is here once it lets go (see below)
            handed_over = False
            try:
                message = self._message()
                if len(message) > _DIRECT_SEND_MAX and not blocking:
                    self._big.put(message)  # the writer sends it, then lets go
                    handed_over = True
                    return
                self._connection.send_bytes(message)
            except OSError:
                return  # the parent is gone: the reader sees it too
            finally:
                if not handed_over:
                    self._send_lock.release()
            # Events added while we sent, by a thread that found the lock taken.

    def _message(self) -> bytes:
        batch: list[tuple[Any, ...]] = []
        events = self._events
        while events:
            event = events.popleft()
            if event[0] == "future":
                batch.append(("done", event[1], encoded_outcome(event[2])))
            else:
                batch.append(event)
        worker = self._worker
        # First in the message, read after the events: the parent's counts already
        # include what the outcomes and log records that follow imply.
        batch.insert(0, ("status", worker._restarts, worker._stalls, worker._loop_lag))
        return pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)

    def _write_big(self) -> None:
        while (message := self._big.get()) is not None:
            try:
                self._connection.send_bytes(message)
            except OSError:
                pass  # the parent is gone
            finally:
                self._send_lock.release()
            self._flush(blocking=True)


def encoded_outcome(future: Future[Any]) -> bytes | None:
    """A settled future's outcome for the parent; ``None`` if it was cancelled."""
    if future.cancelled():
        return None
    exc = future.exception()
    return encode_outcome(True, future.result()) if exc is None else encode_outcome(False, exc)


class _ForwardToParent(logging.Handler):
    """Sends this process's ``portal_pool`` log records to the parent's logger."""

    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._outbox.put(("log", record.levelno, self.format(record)))
        except Exception:
            self.handleError(record)


def _forward_logs(outbox: _Outbox) -> None:
    logger = logging.getLogger("portal_pool")
    logger.addHandler(_ForwardToParent(outbox))
    logger.propagate = False  # the parent shows them: not twice on the shared stderr
