"""Ctrl-C landing at chosen points of the pool's exit paths."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool


def _waiting_for_workers(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside the pool's wait for its workers to end."""
    frame = sys._current_frames().get(thread.ident or -1)
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return {"_join_workers", "wait_in_slices"} <= names


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_shutdown_cancels_and_waits_for_the_clean_up_and_a_second_stops(
    make_pool: Callable[..., PortalPool[Any]], presses: int
) -> None:
    running, cleaning, release = threading.Event(), threading.Event(), threading.Event()
    cleaned: list[bool] = []

    async def task() -> None:
        running.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaning.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(release.wait)
            cleaned.append(True)

    def press_ctrl_c(main: threading.Thread) -> None:
        # Ctrl-C once the main thread waits in shutdown(); again (or the clean-up ends)
        # once the first has cancelled the task.
        while not _waiting_for_workers(main):
            time.sleep(0.001)
        signal.pthread_kill(main.ident or 0, signal.SIGINT)
        assert cleaning.wait(10)
        if presses == 2:
            signal.pthread_kill(main.ident or 0, signal.SIGINT)
        else:
            release.set()

    pool = make_pool(1)
    pool.submit(task)
    assert running.wait(10)
    presser = threading.Thread(target=press_ctrl_c, args=(threading.current_thread(),))
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.shutdown()
        worker = pool.workers[0]
        if presses == 1:  # the first Ctrl-C cancelled the task and waited for it
            assert cleaned == [True]
            assert worker._exited.done()
        else:  # the second stopped the wait for the clean-up
            assert not worker._exited.done()
    finally:
        release.set()
        presser.join()
