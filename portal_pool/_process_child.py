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
from concurrent.futures import Future, wait
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from ._host import LoopSettings
from ._pickling import decode_call, encode_outcome, run_encoded
from ._thread_host import ThreadHost
from ._watchdog import StallWatchdog
from ._worker import Worker

# How long the work of a child whose parent is gone gets to end its clean-up.
_ORPHAN_GRACE = 1.5

_Outbox = queue.SimpleQueue[Any]


def child_main(connection: Connection, config_blob: bytes) -> None:
    """The worker process's entry point (the target of its ``multiprocessing.Process``)."""
    # First: a Ctrl-C in the terminal reaches the whole process group, and it is the
    # parent's to handle, by cancelling the work here. trio and asyncio install their
    # own SIGINT handler only over the default one, so they leave this alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    make_config, args, kwargs = decode_call(config_blob)
    config: dict[str, Any] = make_config(*args, **kwargs)
    outbox: _Outbox = queue.SimpleQueue()
    _forward_logs(outbox)
    settings = LoopSettings(
        backend=config["backend"],
        backend_options=config["backend_options"],
        context_factory=config["context_factory"],
        thread_name_prefix=config["thread_name_prefix"],
        max_concurrency=None,  # the parent sends no more than that
        pending_limit=None,  # the parent admits the work
        stall_timeout=config["stall_timeout"],
    )
    worker: Worker[Any] = Worker(config["index"], ThreadHost(), settings)
    writer = threading.Thread(
        target=_write, args=(connection, outbox, worker), name="portal_pool-writer"
    )
    writer.start()
    worker._ready.add_done_callback(partial(_report_ready, outbox))
    # After every task's outcome: the loop has settled them all when it exits.
    worker._exited.add_done_callback(lambda _: outbox.put(None))
    worker._start()
    watchdog = None
    if settings.stall_timeout is not None:
        # After each check, a message: the status that ends it gives the parent the new
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
        writer.join()


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
                try:
                    future = worker.submit(run_encoded, blob)
                except BaseException as exc:  # the worker is broken: say so, per call
                    outbox.put(("done", call_id, encode_outcome(False, exc)))
                    continue
                futures[call_id] = future
                future.add_done_callback(partial(_report_done, outbox, futures, call_id))
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
    # Encoded by the writer, not here in the loop thread: pickling a large result would
    # stall every other task of this loop.
    futures.pop(call_id, None)
    outbox.put(("future", call_id, future))


def _write(connection: Connection, outbox: _Outbox, worker: Worker[Any]) -> None:
    """Send what the outbox collects, one message per burst, until the worker has ended."""
    ending = False
    while not ending:
        events = [outbox.get()]
        try:
            while True:
                events.append(outbox.get_nowait())
        except queue.Empty:
            pass
        batch: list[tuple[Any, ...]] = []
        for event in events:
            if event is None:
                ending = True
            elif event[0] == "future":
                _, call_id, future = event
                batch.append(("done", call_id, _encoded(future)))
            else:
                batch.append(event)
        # First in the message, read after the events: the parent's counts already
        # include what the outcomes and log records that follow imply.
        batch.insert(0, ("status", worker._restarts, worker._stalls, worker._loop_lag))
        if ending:
            batch.append(("bye",))
        try:
            connection.send_bytes(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
        except OSError:
            return  # the parent is gone: the main thread sees it too


def _encoded(future: Future[Any]) -> bytes | None:
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
