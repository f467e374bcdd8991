"""The parent's end of a worker process: one *link* thread per worker owns the pipe.

The link sends calls, cancellations and the stop, and settles the futures from what
comes back. It waits on the pipe, a wake-up socket and the process's sentinel at once,
so a child that dies is noticed at once: only the calls it held fail, and the work not
yet sent to it waits for its replacement.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import selectors
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

from ._exceptions import BrokenPortalPool, safe_repr
from ._future import TaskFuture
from ._pickling import decode_outcome
from ._process_child import child_config, child_main
from ._remote import RemoteCounts, RemoteLoop, start_calls
from ._supervision import RestartPolicy

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

    from ._host import LoopSettings
    from ._worker import Worker

logger = logging.getLogger("portal_pool")

# How long a child that has closed its pipe gets to exit before it is killed.
_EXIT_GRACE = 5.0


class ProcessLoop(RemoteLoop):
    """One worker's loop in a child process: the parent's end, run by the link thread."""

    def __init__(self, worker: Worker[Any], settings: LoopSettings, context: BaseContext) -> None:
        self._worker = worker
        self._index = worker.index
        self._context = context
        self._config = child_config(worker.index, settings)
        self._max_concurrency = settings.max_concurrency
        self._thread = threading.Thread(
            target=self._supervise, name=f"{settings.thread_name_prefix}-{self._index}"
        )
        self._process: BaseProcess | None = None
        self._pid: int | None = None
        # Woken by submitters (wake), cancellations and stops: the link waits on this
        # socket together with the pipe and the process sentinel.
        self._wake_receiver, self._wake_sender = socket.socketpair()
        self._wake_receiver.setblocking(False)
        self._wake_sender.setblocking(False)
        self._ids = itertools.count()
        # The link's own state. Work taken from the inbox and not yet sent (bounded by
        # max_concurrency), and the sent calls not yet settled, by id.
        self._waiting: deque[TaskFuture[Any]] = deque()
        self._in_flight: dict[int, TaskFuture[Any]] = {}
        # Written by any thread, read by the link: appends and one-word stores.
        self._cancels: deque[int] = deque()
        self._stop_sent: bool | None = None
        # The current child's own counts, as it last sent them.
        self._child_counts = RemoteCounts()
        self._start_failure: BaseException | None = None  # a replacement's, to log
        self._closed = False  # the wake-up socket, under the worker's lock

    # -- the worker's side ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise RuntimeError(f"worker {self._index}'s process has not started")
        return self._pid

    @property
    def node(self) -> None:
        return None  # one machine

    def wake(self) -> None:
        # Called with the worker's lock held, as the link closes the socket under it:
        # a wake-up never lands on a closed socket, or on a reused file descriptor.
        if not self._closed:
            # Full: a byte is already waiting, so the link wakes anyway.
            with suppress(BlockingIOError):
                self._wake_sender.send(b"\0")

    def stop(self, cancel: bool) -> None:
        # The worker has recorded the request: the link reads it there.
        with self._worker._lock:
            self.wake()

    def terminate(self) -> None:
        process = self._process
        if process is not None:
            with suppress(Exception):
                process.kill()

    def after_fork_in_child(self) -> list[TaskFuture[Any]]:
        held = [*self._waiting, *self._in_flight.values()]
        self._waiting.clear()
        self._in_flight.clear()
        self._process = None
        return held

    def _cancel_remote(self, call_id: int) -> None:
        self._cancels.append(call_id)
        with self._worker._lock:
            self.wake()

    # -- the link thread ------------------------------------------------------------------

    def _supervise(self) -> None:
        worker = self._worker
        try:
            policy = RestartPolicy()
            while True:
                failure, accepted = self._run_one_child()
                if failure is None or worker._stop_request is not None:
                    break
                if not accepted and not policy.restarted:
                    break  # a failed start, which PortalPool(...) reports
                why = policy.gives_up(accepted)
                if why is None:
                    worker._restarts += 1
                    logger.warning(
                        "worker %d's process %s; starting another (restart %d)",
                        self._index,
                        failure,
                        worker._restarts,
                    )
                    continue
                reason = f"{failure}, and {why}" if accepted else why
                worker._broken_by = f"its process {reason}"
                logger.error(
                    "worker %d's process %s; the worker is broken: work sent to it fails "
                    "with BrokenPortalPool",
                    self._index,
                    reason,
                    exc_info=self._start_failure,
                )
                break
        finally:
            with worker._lock:
                worker._closed = True
                worker._waker = None
                self._closed = True
                self._wake_receiver.close()
                self._wake_sender.close()
            worker._fail_queued(BrokenPortalPool(f"worker {self._index}'s process has ended"))
            worker._exited.set_result(None)

    def _run_one_child(self) -> tuple[str | None, bool]:
        """Run one child to its end; return why it failed (``None``: it was stopped)
        and whether it started serving."""
        worker = self._worker
        receiver, sender = self._context.Pipe(duplex=True)
        # The context's Process class: typeshed gives BaseContext none.
        make_process = cast("Callable[..., BaseProcess]", self._context.Process)  # type: ignore[attr-defined]
        process = make_process(
            target=child_main,
            args=(sender, self._config),
            name=f"{self._thread.name}-process",
        )
        try:
            process.start()
        except BaseException as exc:
            receiver.close()
            sender.close()
            if not worker._ready.done():
                worker._ready.set_exception(exc)
            return f"could not start: {safe_repr(exc)}", False
        sender.close()  # the child's end: only the child holds it now
        self._process = process
        self._pid = process.pid
        self._stop_sent = None
        self._child_counts.reset()
        link = _ChildLink(self, receiver, process)
        died = True
        try:
            died = link.serve()
        finally:
            receiver.close()
            process.join(_EXIT_GRACE)
            if process.exitcode is None:  # it closed its pipe, yet goes on
                process.kill()
                process.join()
            self._child_ended(link.accepted)
        if died:
            return _how_it_ended(process.exitcode), link.accepted
        return (None if link.accepted else "could not start its loop"), link.accepted

    def _child_ended(self, accepted: bool) -> None:
        """Whatever the child held and did not settle fails; what it never got waits."""
        worker = self._worker
        process = self._process
        assert process is not None
        with worker._lock:
            worker._waker = None
            worker._inbox.extendleft(reversed(self._waiting))
            worker._wake_pending = True
        self._waiting.clear()
        self._cancels.clear()
        in_flight, self._in_flight = self._in_flight, {}
        worker._active = 0
        self._child_counts.reset()
        if in_flight:
            broken = BrokenPortalPool(
                f"worker {self._index}'s process (pid {process.pid}) "
                f"{_how_it_ended(process.exitcode)} while it ran this call"
            )
            for future in in_flight.values():
                future._settle_broken(broken)
        self._process = None


class _ChildLink:
    """One child's pipe, from the parent's side: the link thread's loop for that child."""

    def __init__(self, loop: ProcessLoop, connection: Connection, process: BaseProcess) -> None:
        self._loop = loop
        self._worker = loop._worker
        self._connection = connection
        self._process = process
        self.accepted = False
        self._said_bye = False

    def serve(self) -> bool:
        """Serve the child until it says goodbye (``False``) or dies (``True``)."""
        loop = self._loop
        # One selector for the child's life: multiprocessing.connection.wait() would
        # build and fill a new one on every wake-up, twice per round trip.
        with selectors.DefaultSelector() as selector:
            selector.register(self._connection, selectors.EVENT_READ)
            selector.register(loop._wake_receiver, selectors.EVENT_READ)
            selector.register(self._process.sentinel, selectors.EVENT_READ)
            return self._serve(selector)

    def _serve(self, selector: selectors.BaseSelector) -> bool:
        loop = self._loop
        sentinel = self._process.sentinel
        while True:
            ready = {key.fd for key, _ in selector.select()}
            if loop._wake_receiver.fileno() in ready:
                with suppress(BlockingIOError):
                    loop._wake_receiver.recv(4096)
            try:
                # Everything the child sent, before a death that the sentinel shows.
                if self._connection.fileno() in ready or sentinel in ready:
                    while self._connection.poll():
                        self._receive(pickle.loads(self._connection.recv_bytes()))
                if self._said_bye:
                    return False
                if sentinel in ready:
                    raise EOFError
                if self.accepted:
                    self._send_pending()
                elif self._worker._stop_request is not None:
                    self._send_stop()  # stopped while starting
            except (EOFError, OSError):
                return True

    def _receive(self, events: list[tuple[Any, ...]]) -> None:
        loop, worker = self._loop, self._worker
        for event in events:
            kind = event[0]
            if kind == "done":
                future = loop._in_flight.pop(event[1], None)
                if future is not None:
                    if event[2] is None:
                        future._settle_cancelled()
                    else:
                        future._settle(*decode_outcome(event[2]))
            elif kind == "status":
                loop._child_counts.apply(worker, event[1:])
            elif kind == "log":
                logger.log(event[1], "%s", event[2])
            elif kind == "ready":
                self.accepted = True
                with worker._lock:
                    worker._waker = loop
                    worker._wake_pending = False
                if not worker._ready.done():
                    worker._ready.set_result(None)
            elif kind == "failed":
                _, exc = decode_outcome(event[1])
                if not worker._ready.done():
                    worker._ready.set_exception(exc)  # type: ignore[arg-type]
                else:
                    loop._start_failure = exc  # type: ignore[assignment]
            elif kind == "bye":
                self._said_bye = True
        worker._active = len(loop._in_flight)

    def _send_pending(self) -> None:
        loop, worker = self._loop, self._worker
        stop = worker._stop_request  # read before the inbox: work before it is all there
        loop._waiting.extend(worker._take_inbox())
        if stop:
            for future in loop._waiting:  # never sent, so cancelled here
                future.cancel()
        calls = start_calls(
            loop, worker, loop._waiting, loop._in_flight, loop._max_concurrency, loop._ids
        )
        messages: list[tuple[str, Any]] = []
        if calls:
            messages.append(("calls", calls))
        if loop._cancels:
            cancels: list[int] = []
            with suppress(IndexError):
                while True:
                    cancels.append(loop._cancels.popleft())
            messages.append(("cancel", cancels))
        for message in messages:
            self._connection.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        if stop is not None and (stop or not loop._waiting):
            self._send_stop()

    def _send_stop(self) -> None:
        loop = self._loop
        stop = self._worker._stop_request
        if stop is None or loop._stop_sent is stop or loop._stop_sent is True:
            return
        loop._stop_sent = stop
        self._connection.send_bytes(pickle.dumps(("stop", stop)))


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its pipe"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"
