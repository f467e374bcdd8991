"""Signal state: nothing a task starts inherits a changed signal mask from the pool."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")

# The child reports its blocked signals as soon as it runs, then waits to be terminated.
CHILD = [
    sys.executable,
    "-c",
    "import signal, time\n"
    "print(sorted(map(int, signal.pthread_sigmask(signal.SIG_BLOCK, []))), flush=True)\n"
    "time.sleep(60)\n",
]
# How long a terminated child may take to end; one that blocks SIGTERM never does.
TERMINATE_GRACE = 5
IGNORED_TERMINATE = "the child ignored terminate()"


def _mask() -> set[int]:
    """The calling thread's blocked signals."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def _parse(line: str | bytes) -> set[int]:
    text = line.decode() if isinstance(line, bytes) else line
    return {int(number) for number in text.strip().strip("[]").split(",") if number.strip()}


def _child_from_sync_call() -> tuple[set[int], int | str]:
    with subprocess.Popen(CHILD, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            mask = _parse(child.stdout.readline())
            child.terminate()
            try:
                return mask, child.wait(TERMINATE_GRACE)
            except subprocess.TimeoutExpired:
                return mask, IGNORED_TERMINATE
        finally:
            child.kill()


async def _child_from_asyncio() -> tuple[set[int], int | str]:
    child = await asyncio.create_subprocess_exec(*CHILD, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        with anyio.fail_after(10):
            mask = _parse(await child.stdout.readline())
        child.terminate()
        with anyio.move_on_after(TERMINATE_GRACE):
            return mask, await child.wait()
        return mask, IGNORED_TERMINATE
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def _child_from_trio() -> tuple[set[int], int | str]:
    import trio

    async with trio.open_nursery() as nursery:
        # trio starts the process from one of its cached to_thread threads.
        run = partial(trio.run_process, CHILD, stdout=subprocess.PIPE, check=False)
        child = await nursery.start(run)
        try:
            line = b""
            with trio.fail_after(10):
                while not line.endswith(b"\n"):
                    line += await child.stdout.receive_some()
            child.terminate()
            with trio.move_on_after(TERMINATE_GRACE):
                return _parse(line), await child.wait()
            return _parse(line), IGNORED_TERMINATE
        finally:
            child.kill()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["sync call", "event loop"])
def test_processes_started_by_tasks_get_the_default_mask_and_terminate(
    make_pool: Callable[..., PortalPool[Any]], pool_backend: str, how: str
) -> None:
    pool = make_pool(1)
    if how == "sync call":
        started: Callable[[], Any] = _child_from_sync_call
    else:
        started = _child_from_trio if pool_backend == "trio" else _child_from_asyncio
    # The child's mask is the main thread's, and terminate() ends it.
    assert pool.run(started) == (_mask(), -signal.SIGTERM)


@pytest.mark.timeout(30)
def test_threads_started_by_tasks_get_the_default_mask(
    make_pool: Callable[..., PortalPool[Any]],
) -> None:
    async def masks() -> tuple[set[int], set[int]]:
        plain = threading.Thread(target=lambda: seen.append(_mask()))
        plain.start()
        await anyio.to_thread.run_sync(plain.join)
        return seen[0], await anyio.to_thread.run_sync(_mask)

    seen: list[set[int]] = []
    pool = make_pool(1)
    own_thread, loop_thread = pool.run(masks)
    assert own_thread == _mask()
    assert loop_thread == _mask()


def _kernel_mask(thread: threading.Thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


@pytest.mark.timeout(30)
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_no_thread_outliving_the_pool_has_a_changed_mask(
    backend_kwargs: dict[str, Any],
) -> None:
    async def use_a_thread() -> None:
        await anyio.to_thread.run_sync(lambda: None)

    with PortalPool(2, **backend_kwargs) as pool:
        pool.run(use_a_thread)
    # What is left is not portal_pool's: trio keeps its to_thread workers cached for the
    # next trio.run, in any thread, including plain trio code in the main thread.
    main = _kernel_mask(threading.main_thread())
    changed = [t.name for t in threading.enumerate() if _kernel_mask(t) != main]
    assert not changed, f"threads left with a changed signal mask: {changed}"


@pytest.mark.timeout(30)
def test_trio_in_the_main_thread_gets_cached_threads_with_the_default_mask(
    backend_kwargs: dict[str, Any],
) -> None:
    trio = pytest.importorskip("trio")

    async def use_a_thread() -> None:
        await anyio.to_thread.run_sync(lambda: None)

    with PortalPool(2, **backend_kwargs) as pool:
        pool.run(use_a_thread)
    assert trio.run(trio.to_thread.run_sync, _mask) == _mask()
