"""The seed pattern: asyncio loops run with ``run_forever`` in threads.

Work goes out round robin with ``asyncio.run_coroutine_threadsafe`` and each loop is
stopped with ``loop.call_soon_threadsafe(loop.stop)``, as in the blog post the project
grew from (``/work/shared/seed``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class SeedPool:
    """``workers`` asyncio loops, each in its own thread, fed round robin."""

    def __init__(self, workers: int = 2) -> None:
        self._loops = [asyncio.new_event_loop() for _ in range(workers)]
        self._threads = [
            threading.Thread(target=self._serve, args=(loop,), name=f"seed-loop-{index}")
            for index, loop in enumerate(self._loops)
        ]
        self._next = 0
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def submit(self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the next loop; return a ``concurrent.futures.Future``."""
        loop = self._loops[self._next]
        self._next = (self._next + 1) % len(self._loops)
        return asyncio.run_coroutine_threadsafe(fn(*args), loop)

    def shutdown(self) -> None:
        """Stop every loop, join its thread and close it."""
        for loop in self._loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread in self._threads:
            thread.join()
        for loop in self._loops:
            loop.close()
