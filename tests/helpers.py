"""Small tools shared by the tests: a loop held busy, and an input that counts its reads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any


@contextmanager
def loop_held(submit: Callable[[Callable[[], None]], Future[Any]]) -> Iterator[Future[Any]]:
    """Hold a worker's loop with a sync call until the block exits; work queues behind it.

    ``submit`` is a worker's (or a one-worker pool's) ``submit``. Yields the holding
    call's future once that call is running; leaving the block lets it return ``None``.
    """
    running = threading.Event()
    release = threading.Event()

    def hold() -> None:  # a sync callable: nothing else runs on that loop meanwhile
        running.set()
        assert release.wait(10)

    holder = submit(hold)
    try:
        assert running.wait(10), "the loop never ran the holding call"
        yield holder
    finally:
        release.set()


class CountingSource:
    """The items ``range(count)``, counting how many have been read so far."""

    def __init__(self, count: int) -> None:
        self._count = count
        self.consumed = 0

    def __iter__(self) -> Iterator[int]:
        for item in range(self._count):
            self.consumed += 1
            yield item
