"""Waiting for a future from sync code and from any event loop, and waking a loop from
any thread through its anyio event-loop token."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import EventLoopToken, current_token

T = TypeVar("T")


def call_soon_or_drop(token: EventLoopToken, fn: Callable[..., object], *args: Any) -> bool:
    """Schedule ``fn`` in the token's loop; return ``False`` if that loop has finished.

    Never waits for the loop, so it is safe from any thread, including one that runs a
    trio loop of its own, where anyio's blocking portal calls hang.
    """
    try:
        token.backend_class.run_sync_soon(fn, args, token.native_token)
    except anyio.RunFinishedError:
        return False
    return True


async def wait_future(future: Future[Any]) -> None:
    """Await a ``concurrent.futures.Future`` from asyncio or trio without blocking."""
    if future.done():
        return
    token = current_token()
    done = anyio.Event()
    future.add_done_callback(lambda _: call_soon_or_drop(token, done.set))
    await done.wait()


def wait_for_result(future: Future[T]) -> T:
    """Block on ``future``; if the wait itself is interrupted, cancel the work."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
