"""Small tools shared by the tests: a loop held busy, an input that counts its reads, and
a tracer that acts at a chosen line."""

from __future__ import annotations

import dis
import linecache
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures._base import (  # the states are not re-exported publicly
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any

import anyio


@contextmanager
def loop_held(
    submit: Callable[[Callable[[], None]], Future[Any]], shared: Any = threading
) -> Iterator[Future[Any]]:
    """Hold a worker's loop with a sync call until the block exits; work queues behind it.

    ``submit`` is a worker's (or a one-worker pool's) ``submit``. Yields the holding
    call's future once that call is running; leaving the block lets it return ``None``.
    On the process host, pass the ``shared`` fixture: its events reach the worker.
    """
    running = shared.Event()
    release = shared.Event()

    def hold() -> None:  # a sync callable: nothing else runs on that loop meanwhile
        running.set()
        assert release.wait(10)

    holder = submit(hold)
    try:
        assert running.wait(10), "the loop never ran the holding call"
        yield holder
    finally:
        release.set()


async def event_set(event: Any, timeout: float = 10) -> None:
    """Wait in a task, without blocking its loop or starting a thread, for ``event``
    (a ``threading.Event`` or a ``shared`` one) to be set.

    :raises TimeoutError: if it is not set within ``timeout`` seconds
    """
    with anyio.fail_after(timeout):
        while not event.is_set():
            await anyio.sleep(0.002)


class CountingSource:
    """The items ``range(count)``, counting how many have been read so far."""

    def __init__(self, count: int) -> None:
        self._count = count
        self.consumed = 0

    def __iter__(self) -> Iterator[int]:
        for item in range(self._count):
            self.consumed += 1
            yield item


def at_line(function: str, source: str, action: Callable[[], object]) -> Callable[..., Any]:
    """A ``sys.settrace`` tracer: call ``action`` when ``function`` is about to run the
    line whose text is ``source`` (once per call of ``function``)."""

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_name != function:
            return None

        def line(frame: FrameType, event: str, arg: object) -> Any:
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if event == "line" and text == source:
                action()
                return None
            return line

        return line

    return tracer


@contextmanager
def raised_after_call(
    code: CodeType, fragment: str, action: Callable[[], object]
) -> Iterator[None]:
    """Within the block, call ``action`` in this thread once, as the call on the line of
    ``code`` that contains ``fragment`` has just returned, before its value is stored.

    That is where CPython runs a signal handler that arrived during a call (its check
    follows every call), so an ``action`` that raises stands for a Ctrl-C landing there:
    a point that line tracing cannot reach. Python 3.12+ watch instructions with
    ``sys.monitoring`` (``f_trace_opcodes`` set in a call event only takes effect at the
    code's next call there); older ones with ``sys.settrace``.
    """
    target = _offset_after_call(code, fragment)
    thread = threading.get_ident()
    fired = False

    def at(where: CodeType, offset: int) -> None:
        nonlocal fired
        if where is code and offset == target and not fired and threading.get_ident() == thread:
            fired = True
            action()

    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:

        def tracer(frame: FrameType, event: str, arg: object) -> Any:
            if frame.f_code is not code:
                return None
            frame.f_trace_opcodes = True

            def opcode(frame: FrameType, event: str, arg: object) -> Any:
                if event == "opcode":
                    at(frame.f_code, frame.f_lasti)
                return opcode

            return opcode

        sys.settrace(tracer)
        try:
            yield
        finally:
            sys.settrace(None)
        return
    tool = next(tool for tool in range(6) if monitoring.get_tool(tool) is None)
    monitoring.use_tool_id(tool, "portal_pool tests")
    instruction = monitoring.events.INSTRUCTION
    try:
        monitoring.register_callback(tool, instruction, at)
        monitoring.set_local_events(tool, code, instruction)
        yield
    finally:
        monitoring.set_local_events(tool, code, 0)
        monitoring.register_callback(tool, instruction, None)
        monitoring.free_tool_id(tool)


def _offset_after_call(code: CodeType, fragment: str) -> int:
    """The offset of the instruction after the last call on the line containing ``fragment``."""
    starts = sorted((offset, line) for offset, line in dis.findlinestarts(code) if line)
    instructions = list(dis.get_instructions(code))
    found = None
    for position, instruction in enumerate(instructions[:-1]):
        line = max((start for start in starts if start[0] <= instruction.offset), default=None)
        if line is None or fragment not in linecache.getline(code.co_filename, line[1]):
            continue
        if instruction.opname.startswith("CALL"):
            found = instructions[position + 1].offset
    if found is None:
        raise LookupError(f"no call on a line containing {fragment!r} in {code.co_name}")
    return found


def cancel_and_classify(future: Future[Any]) -> str:
    """Cancel a pool's future; return the state that ``cancel()`` found it in: ``PENDING``
    (so its task never starts), ``RUNNING``, ``FINISHED`` (too late) or
    ``CANCELLED_AND_NOTIFIED`` (cancelled before).

    Read after the call, from the future's ``_started``, which is set under the future's
    lock as it turns ``RUNNING``, and never again: a cancel that found it pending leaves it
    unset for good. Reading the state first, with the future's lock held across the call,
    would not freeze it: a cancel from the thread that holds the lock is handed over until
    it lets go (as a signal handler's is), and the loop may start or finish the task in
    between, which the free-threaded build shows.
    """
    if future.cancelled():
        future.cancel()
        return CANCELLED_AND_NOTIFIED
    if not future.cancel():
        return FINISHED
    return RUNNING if future._started else PENDING  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a condition that only another thread or process can make true; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)
