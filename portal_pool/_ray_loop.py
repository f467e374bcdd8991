"""The pool's end of a worker in a Ray actor: one *feeder* thread per worker.

The feeder sends the worker's calls (as far as ``max_concurrency``'s credit window
allows), its cancellations and its stop, and settles its futures from the answers. Ray
calls back in threads of its own, which must not wait: they only queue each answer for
the feeder, so a future's callbacks never run, or block, in Ray's threads. The feeder
also keeps one ``watch`` call waiting in the actor, which answers the worker's counts and
log records, and fails at once if the actor dies; then the feeder waits for Ray to
restart the actor, or gives the worker up.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from ._exceptions import BrokenPortalPool, safe_repr
from ._pickling import decode_outcome
from ._process_child import child_config
from ._remote import RemoteCounts, RemoteLoop, start_calls

if TYPE_CHECKING:
    from ._future import TaskFuture
    from ._host import LoopSettings
    from ._worker import Worker

logger = logging.getLogger("portal_pool")

# Waiting for Ray, the feeder wakes up this often to look for a stop: an actor that Ray
# cannot place (no node has the resources it asks for) must not hang a shutdown.
_POLL = 0.1
# How long a killed actor gets to be reported dead before shutdown goes on without it.
_DEATH_GRACE = 10.0


class _Stopped(Exception):
    """The pool was stopped while the feeder waited for Ray."""


class RayLoop(RemoteLoop):
    """One worker's loop in a Ray actor: the pool's end, run by the feeder thread."""

    def __init__(
        self, worker: Worker[Any], settings: LoopSettings, ray: Any, actor: Any, max_restarts: int
    ) -> None:
        self._worker = worker
        self._max_restarts = max_restarts
        self._index = worker.index
        self._ray = ray
        self._make_actor = actor
        self._actor: Any = None
        self._config = child_config(worker.index, settings)
        self._max_concurrency = settings.max_concurrency
        self._thread = threading.Thread(
            target=self._run, name=f"{settings.thread_name_prefix}-{self._index}"
        )
        # Everything the feeder acts on: None (look at the inbox, cancels and stop), or
        # an answer from Ray. A SimpleQueue, whose put() may re-enter (a submit from a
        # signal handler landing inside another's wake-up): a lock would deadlock there.
        self._events: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._sent_below = 0  # every call sent so far has a lower id
        # The feeder's own state: work taken from the inbox and not yet sent, and the sent
        # calls not yet settled, by id.
        self._waiting: deque[TaskFuture[Any]] = deque()
        self._in_flight: dict[int, TaskFuture[Any]] = {}
        # Appended by any thread (cancel()), taken by the feeder.
        self._cancels: deque[int] = deque()
        self._stop_sent: Any = None  # a cancelling stop sent at once: its answer's ref
        self._counts = RemoteCounts()
        self._pid: int | None = None
        self._node: str | None = None
        self._lost: BaseException | None = None  # why the actor may be gone
        self._watching: Any = None  # the waiting watch call's ref, until it answers

    # -- the worker's side ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise RuntimeError(f"worker {self._index}'s actor has not started")
        return self._pid

    @property
    def node(self) -> str | None:
        return self._node

    def wake(self) -> None:
        self._events.put(None)

    def stop(self, cancel: bool) -> None:
        self._events.put(None)  # the worker has recorded the request: the feeder reads it

    def terminate(self) -> None:
        if self._actor is not None:
            with suppress(Exception):
                self._ray.kill(self._actor, no_restart=True)

    def after_fork_in_child(self) -> list[TaskFuture[Any]]:
        held = [*self._waiting, *self._in_flight.values()]
        self._waiting.clear()
        self._in_flight.clear()
        self._actor = None  # the parent's: a forked child does not reach Ray
        return held

    def _cancel_remote(self, call_id: int) -> None:
        self._cancels.append(call_id)
        self._events.put(None)

    # -- the feeder thread ----------------------------------------------------------------

    def _run(self) -> None:
        worker = self._worker
        # A done-callback that waits for this worker's own future would wait for the
        # feeder that runs it: the worker's guards refuse that instead of hanging.
        worker._thread_ident = threading.get_ident()
        broken: BaseException | None = None
        try:
            if self._start():
                self._serve()
        except _Stopped:
            pass
        except BaseException as exc:
            broken = exc
            worker._broken_by = f"its actor {_text(exc)}"
            logger.error(
                "worker %d's actor %s; the worker is broken: work sent to it fails with "
                "BrokenPortalPool",
                self._index,
                exc,
            )
        finally:
            self._end_actor()
            with worker._lock:
                worker._closed = True
                worker._waker = None
            if not worker._ready.done():
                worker._ready.set_exception(BrokenPortalPool("the pool was stopped while starting"))
            ended = BrokenPortalPool(
                f"worker {self._index}'s actor has ended"
                + ("" if broken is None else f": {_text(broken)}")
            )
            for future in self._waiting:
                future._settle_broken(ended)
            self._waiting.clear()
            worker._fail_queued(ended)
            worker._exited.set_result(None)

    def _start(self) -> bool:
        """Start the actor; ``True`` once its worker serves, ``False`` if it failed."""
        worker = self._worker
        try:
            self._actor = self._make_actor.remote(self._config)
            answer = self._wait_for(_control(self._actor.ready).remote())
        except _Stopped:
            raise
        except BaseException as exc:
            worker._ready.set_exception(exc)
            return False
        if answer[0] == "failed":
            worker._ready.set_exception(_failure(answer))
            return False
        self._pid, self._node = answer[1], answer[2]
        with worker._lock:
            worker._waker = self
            worker._wake_pending = False
        worker._ready.set_result(None)
        self._watch()
        return True

    def _serve(self) -> None:
        """Send calls, cancellations and the stop, and settle the answers, until the
        worker is stopped and nothing is left in flight."""
        worker, events = self._worker, self._events
        events.put(None)  # the inbox may have filled while the actor started
        while True:
            self._handle(events.get())
            with suppress(queue.Empty):
                while True:  # one pass for the whole burst of events
                    self._handle(events.get_nowait())
            if self._lost is not None:
                self._recover()
            stop = worker._stop_request  # read before the inbox: work before it is all there
            self._waiting.extend(worker._take_inbox())
            if stop:
                for future in self._waiting:  # never sent, so cancelled here
                    future.cancel()
            self._send(stop)
            if stop is not None and not self._waiting and not self._in_flight:
                return

    def _send(self, stop: bool | None) -> None:
        in_flight = self._in_flight
        calls = start_calls(
            self, self._worker, self._waiting, in_flight, self._max_concurrency, self._ids
        )
        actor = self._actor
        for call_id, blob in calls:
            self._on_answer(actor.call.remote(call_id, blob), ("call", call_id))
            self._sent_below = call_id + 1
        cancels: list[int] = []
        with suppress(IndexError):
            while True:
                cancels.append(self._cancels.popleft())
        if stop and self._stop_sent is None:
            # The actor's worker cancels its tasks, as a thread-host worker's stop does: a
            # task that ends anyway keeps its outcome (a sync call, say).
            self._stop_sent = _control(actor.stop).remote(True)
        if cancels:
            # Every call below the lowest id in flight is settled here.
            _control(actor.cancel).remote(cancels, min(in_flight, default=self._sent_below))

    def _on_answer(self, ref: Any, event: tuple[Any, ...]) -> None:
        """Have the feeder handle ``event`` once the call behind ``ref`` answers."""
        events = self._events
        _when_answered(ref, lambda answer: events.put((*event, answer)))

    def _watch(self) -> None:
        self._watching = _control(self._actor.watch).remote()
        self._on_answer(self._watching, ("watch", self._actor))

    def _handle(self, event: tuple[Any, ...] | None) -> None:
        if event is None:
            return
        kind, answer = event[0], event[-1]
        if kind == "call":
            future = self._in_flight.pop(event[1], None)
            self._worker._active = len(self._in_flight)
            if future is None:
                return
            try:
                status, outcome = _unwrap(answer)
            except BaseException as exc:
                self._lost = exc
                future._settle_broken(self._broken_call(exc))
                return
            self._apply(status)
            if outcome is None:
                future._settle_cancelled()
            else:
                future._settle(*decode_outcome(outcome))
        elif kind == "watch" and event[1] is self._actor:
            self._watching = None
            try:
                self._apply(_unwrap(answer))
            except BaseException as exc:
                self._lost = exc
            else:
                if self._worker._stop_request is None:
                    self._watch()

    def _apply(self, report: tuple[Any, list[tuple[int, str]]]) -> None:
        """Take in what the actor reported: its counts, then its log records."""
        status, records = report
        self._counts.apply(self._worker, status)
        for level, text in records:
            logger.log(level, "%s", text)

    def _broken_call(self, exc: BaseException) -> BrokenPortalPool:
        broken = BrokenPortalPool(
            f"worker {self._index}'s actor (pid {self._pid}) failed while it ran this "
            f"call, which may or may not have run: {_text(exc)}"
        )
        broken.__cause__ = exc
        return broken

    def _recover(self) -> None:
        """The actor may have died: wait for Ray to restart it, or give up.

        :raises BaseException: why the worker is broken (no restarts left, or its
            ``worker_context`` failed in the restarted actor)
        """
        lost, self._lost = self._lost, None
        unavailable = self._ray.exceptions.ActorUnavailableError
        try:
            while True:
                try:
                    answer = self._wait_for(_control(self._actor.ready).remote())
                    break
                except unavailable:
                    # Restarting: Ray refuses calls meanwhile, and says nothing when it
                    # is back. Ask again shortly.
                    self._pause()
        except _Stopped:
            raise
        except BaseException as exc:
            raise RuntimeError(
                f"died ({_text(lost)}), and Ray did not restart it "
                f"(max_restarts={self._max_restarts}): {_text(exc)}"
            ) from exc
        if answer[0] == "failed":
            failure = _failure(answer)
            raise RuntimeError(
                f"was restarted, and its worker_context failed there: {safe_repr(failure)}"
            ) from failure
        pid, self._node = answer[1], answer[2]
        if pid != self._pid:
            self._worker._restarts += 1
            self._counts.reset()
            logger.warning(
                "worker %d's actor (pid %s) died: Ray restarted it (pid %s; restart %d)",
                self._index,
                self._pid,
                pid,
                self._worker._restarts,
            )
            self._pid = pid
        self._watch()

    def _pause(self) -> None:
        """Wait a little, handling events meanwhile.

        :raises _Stopped: if the pool is stopped
        """
        with suppress(queue.Empty):
            self._handle(self._events.get(timeout=_POLL))
        if self._worker._stop_request is not None:
            raise _Stopped

    def _wait_for(self, ref: Any) -> Any:
        """Wait for ``ref``'s answer, handling other events meanwhile.

        :raises _Stopped: if the pool is stopped first
        :raises BaseException: what the call raised
        """
        answered: queue.SimpleQueue[Any] = queue.SimpleQueue()
        _when_answered(ref, answered.put)
        while True:
            with suppress(queue.Empty):
                return _unwrap(answered.get(timeout=_POLL))
            with suppress(queue.Empty):
                while True:
                    self._handle(self._events.get_nowait())
            if self._worker._stop_request is not None:
                raise _Stopped

    def _end_actor(self) -> None:
        """Stop the worker in the actor, kill the actor, and settle what it still held."""
        actor, ray = self._actor, self._ray
        if actor is None:
            return
        stop = self._worker._stop_request
        if stop is not None and self._lost is None:
            stopped = self._stop_sent or _control(actor.stop).remote(stop)
            with suppress(BaseException):  # dead already: killed below all the same
                self._apply(self._wait_for_death_or(stopped))
                # The waiting watch answers as the worker stops, maybe with the last
                # log records (a worker_context's failing exit, say): take them in.
                if self._watching is not None:
                    self._apply(self._wait_for_death_or(self._watching))
        with suppress(Exception):
            ray.kill(actor, no_restart=True)
        # Answered (with an error) once Ray knows the actor is dead: no actor of this
        # pool outlives shutdown(), even for an instant.
        with suppress(BaseException):
            self._wait_for_death_or(_control(actor.ready).remote())
        ended = BrokenPortalPool(f"worker {self._index}'s actor was killed at shutdown")
        for future in self._in_flight.values():
            future._settle_broken(ended)
        self._in_flight.clear()
        self._worker._active = 0

    def _wait_for_death_or(self, ref: Any) -> Any:
        answered: queue.SimpleQueue[Any] = queue.SimpleQueue()
        _when_answered(ref, answered.put)
        return _unwrap(answered.get(timeout=_DEATH_GRACE))


def _control(method: Any) -> Any:
    """An actor method, to call in the actor's ``"control"`` concurrency group.

    There, a cancellation or a stop never waits behind the calls it is about, and the
    long-lived ``watch`` takes none of their room.
    """
    return method.options(concurrency_group="control")


def _when_answered(ref: Any, callback: Callable[[Any], object]) -> None:
    """Have ``callback(answer)`` called once the call behind ``ref`` has answered: with
    its value, or the exception it raised. In one of Ray's threads: it must not wait.
    """

    # ObjectRef._on_completed is what ObjectRef.future() wraps (and Ray Serve calls):
    # called directly, it saves a future and its done-callback per call, which cost a
    # quarter of the submit throughput. The callback holds the ref, which must live
    # until it is answered.
    def answered(answer: Any, _ref: Any = ref) -> None:
        callback(answer)

    ref._on_completed(answered)


def _unwrap(answer: Any) -> Any:
    """The value an answer carries; raise if it is the exception the call raised."""
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _failure(answer: tuple[Any, ...]) -> BaseException:
    """The exception in a ``("failed", outcome)`` answer of the actor's ``ready``."""
    failure = decode_outcome(answer[1])[1]
    assert isinstance(failure, BaseException)
    return failure


def _text(exc: BaseException | None) -> str:
    """The first line of ``str(exc)``: Ray's messages go on for many lines."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
