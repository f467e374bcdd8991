"""Small tools shared by the tests: a loop held busy, an input that counts its reads, and
a tracer that acts at a chosen line."""

from __future__ import annotations

import linecache
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from types import FrameType
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
