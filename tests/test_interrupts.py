"""Ctrl-C landing at chosen points of the pool's exit paths, forced with a tracer."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import FrameType
from typing import Any

import anyio
import pytest

import portal_pool
from portal_pool import PortalPool
from portal_pool._condition import FutureCondition
from portal_pool._flow import PendingLimit
from portal_pool._lifecycle import wait_done

from .conftest import requires_trio
from .helpers import at_line, loop_held, raised_after_call

PACKAGE = os.path.dirname(portal_pool.__file__)
STDLIB_LOCKS = (os.path.join("concurrent", "futures"), f"{os.sep}threading.py")


def _in_the_exit(frame: FrameType) -> bool:
    """Code that leaving the block runs in the caller's thread, but not trio's own."""
    path = frame.f_code.co_filename
    return path.startswith(PACKAGE) or any(part in path for part in STDLIB_LOCKS)


class CtrlCAtLine:
    """Deliver SIGINT to the running trio handler at the ``land_at``-th line traced.

    trio's handler, given the frame of that line, raises KeyboardInterrupt there unless
    the code is KI-protected, exactly as a real Ctrl-C landing on that line would.
    ``lines`` counts the lines traced.
    """

    def __init__(self, land_at: int) -> None:
        self.land_at = land_at
        self.lines = 0
        self.landed = "nowhere"

    def start(self) -> None:
        sys.settrace(self._calls)

    def _calls(self, frame: FrameType, event: str, arg: object) -> Any:
        return self._lines if _in_the_exit(frame) else None

    def _lines(self, frame: FrameType, event: str, arg: object) -> Any:
        if event != "line":
            return self._lines
        self.lines += 1
        if self.lines - 1 != self.land_at:
            return self._lines
        sys.settrace(None)
        code = frame.f_code
        self.landed = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        handler(signal.SIGINT, frame)
        return None


def _lock_is_free(lock: Any) -> bool:
    """Whether another thread can take ``lock`` (an RLock held here would pass here)."""
    taken: list[bool] = []

    def take() -> None:
        taken.append(lock.acquire(timeout=5))
        if taken[0]:
            lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return taken[0]


async def forever() -> None:
    await anyio.sleep(3600)


def _leave_async_with(
    backend_kwargs: dict[str, Any], land_at: int, *, by_exception: bool
) -> tuple[PortalPool[Any], Future[Any], CtrlCAtLine, BaseException | None]:
    """Leave ``async with pool`` in trio, by an exception or normally, Ctrl-C'd at a line."""
    import trio

    pool: PortalPool[Any] = PortalPool(1, **backend_kwargs)
    if by_exception:
        future = pool.submit(forever)  # cancelled by the exit
    else:
        future = pool.submit(anyio.sleep, 0)
        future.result()  # the exit only waits for the worker to stop
    ctrl_c = CtrlCAtLine(land_at)

    async def main() -> None:
        async with pool:
            ctrl_c.start()  # traced from here: the block's exit
            if by_exception:
                raise RuntimeError("leaving the block")

    # No collection while traced: an earlier pool's finalizer would add lines of its own.
    gc.disable()
    try:
        trio.run(main)
    except RuntimeError:
        return pool, future, ctrl_c, None
    except BaseException as exc:
        return pool, future, ctrl_c, exc
    finally:
        sys.settrace(None)
        gc.enable()
        pool.shutdown(wait=False, cancel_futures=True)  # only if the test is failing
    return pool, future, ctrl_c, None


@requires_trio
@pytest.mark.timeout(180)
@pytest.mark.parametrize("by_exception", [True, False], ids=["by exception", "normally"])
def test_ctrl_c_anywhere_in_leaving_async_with_on_trio_still_cancels_and_joins(
    backend_kwargs: dict[str, Any], by_exception: bool
) -> None:
    *_, counted, interrupt = _leave_async_with(backend_kwargs, -1, by_exception=by_exception)
    assert interrupt is None
    assert counted.lines > 20  # the tracer did see the exit
    for land_at in range(counted.lines):
        pool, future, ctrl_c, interrupt = _leave_async_with(
            backend_kwargs, land_at, by_exception=by_exception
        )
        where = f"Ctrl-C at traced line {land_at}, {ctrl_c.landed}"
        if ctrl_c.lines <= land_at:  # this exit took a shorter path (a worker was quicker)
            assert interrupt is None
            continue
        assert isinstance(interrupt, KeyboardInterrupt), where  # re-raised
        for worker in pool.workers:
            assert worker._exited.done(), where  # every worker stopped...
            assert not worker._host_loop._thread.is_alive(), where  # ...and was joined
            assert _lock_is_free(worker._lock), where
        assert future.done(), where
        if by_exception:
            assert future.cancelled(), where
        assert _lock_is_free(future._condition), where


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_shutdown_cancels_and_waits_for_the_clean_up_and_a_second_stops(
    make_pool: Callable[..., PortalPool[Any]], presses: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, cleaning, release = threading.Event(), threading.Event(), threading.Event()
    cleaned: list[bool] = []
    # Told by the wait for the workers itself, not read from the main thread's frames by
    # another thread: on the free-threaded 3.13 build that read is unsafe (CPython
    # gh-152355), and it let the Ctrl-C land as a wait was starting. Anywhere from here
    # on, the Ctrl-C lands inside the wait's try, as the first one.
    joining = threading.Event()

    def announcing(future: Future[Any]) -> None:
        joining.set()
        wait_done(future)

    monkeypatch.setattr(portal_pool._lifecycle, "wait_done", announcing)

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
        assert joining.wait(10)
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


def test_ctrl_c_between_recording_a_stop_and_sending_it(
    make_pool: Callable[..., PortalPool[Any]],
) -> None:
    """A Ctrl-C that cuts ``shutdown()`` off after the stop is recorded but before it is
    sent to the loop: the next ``shutdown()`` sends it again, so the work is cancelled
    and the pool ends, instead of waiting forever for a stop that never arrives."""
    pool = make_pool(1)
    started = threading.Event()
    cleaned_up = threading.Event()

    async def task() -> None:
        try:
            started.set()
            await anyio.sleep_forever()
        finally:
            cleaned_up.set()

    future = pool.submit(task)
    assert started.wait(10)

    def interrupt() -> None:
        raise KeyboardInterrupt  # after the lock is released: the stop is recorded

    tracer = at_line("_request_stop", "for future in queued:", interrupt)

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.shutdown(wait=False, cancel_futures=True)
    finally:
        sys.settrace(None)
    assert pool.workers[0]._stop_request is True  # recorded, never sent
    assert not pool.workers[0]._lock._is_owned()
    pool.shutdown(wait=False, cancel_futures=True)
    assert cleaned_up.wait(10), "the stop never reached the loop"
    pool.shutdown()
    assert future.cancelled()


def test_ctrl_c_as_a_future_wait_lets_go_of_its_lock(
    make_pool: Callable[..., PortalPool[Any]],
) -> None:
    """A Ctrl-C that lands as ``future.result()``'s wait has just let go of the future's
    lock, before it has stored how to take it back: the wait takes it back all the same,
    so ``result()`` raises the KeyboardInterrupt (not "cannot release un-acquired lock")
    and the lock is free for the worker that settles the future.

    Seen on the free-threaded build, where a Ctrl-C sent as the main thread begins to
    wait often lands there.
    """
    pool = make_pool(1)

    def interrupt() -> None:
        raise KeyboardInterrupt

    with loop_held(pool.submit) as holder:
        with (
            raised_after_call(FutureCondition.wait.__code__, "_release_save()", interrupt),
            pytest.raises(KeyboardInterrupt),
        ):
            holder.result()
        assert _lock_is_free(holder._condition)
    assert holder.result(timeout=10) is None


def test_ctrl_c_as_a_full_pools_wait_lets_go_of_its_lock(
    make_pool: Callable[..., PortalPool[Any]],
) -> None:
    """The same for a ``submit`` waiting for room in a full pool (``max_pending``): a
    Ctrl-C landing as the wait has let go of the limit's lock leaves it free, and the
    room counted as it was."""
    pool = make_pool(1, max_pending=1)
    limit = pool._pending_limit
    assert limit is not None

    def interrupt() -> None:
        raise KeyboardInterrupt

    with loop_held(pool.submit) as holder:
        with (
            raised_after_call(PendingLimit._wait.__code__, "self._lock.release()", interrupt),
            pytest.raises(KeyboardInterrupt),
        ):
            pool.submit(anyio.sleep, 0)
        assert _lock_is_free(limit._lock)
        assert limit.count == 1  # the holder's room; the interrupted submit took none
    assert holder.result(timeout=10) is None
    assert pool.submit(anyio.sleep, 0).result(timeout=10) is None
    pool.shutdown()
    assert limit.count == 0


def test_ctrl_c_as_shutdown_waits_for_the_workers(
    make_pool: Callable[..., PortalPool[Any]],
) -> None:
    """The main thread's wait for the workers parks on a plain lock, never in
    ``threading.Condition.wait``: a Ctrl-C raised there as it has let go of its lock (a
    thread watching this one sends it just then on the free-threaded build) leaves the
    lock released, and the wait fails with "release unlocked lock" instead of raising the
    KeyboardInterrupt. One landing as the plain lock's wait returns is the first Ctrl-C:
    it cancels the work, waits for its clean-up, and is raised."""
    pool = make_pool(1)
    running = threading.Event()
    cleaned: list[bool] = []

    async def task() -> None:
        running.set()
        try:
            await anyio.sleep(3600)
        finally:
            cleaned.append(True)

    pool.submit(task)
    assert running.wait(10)
    condition_waits: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is threading.Condition.wait.__code__:
            condition_waits.append(frame.f_back.f_code.co_name if frame.f_back else "?")

    def interrupt() -> None:
        raise KeyboardInterrupt

    constants = wait_done.__code__.co_consts
    # The lambda that waits one slice.
    (wait_slice,) = [code for code in constants if "seconds" in getattr(code, "co_varnames", ())]
    sys.setprofile(profile)
    try:
        with (
            raised_after_call(wait_slice, "done.acquire(True, seconds)", interrupt),
            pytest.raises(KeyboardInterrupt),
        ):
            pool.shutdown()
    finally:
        sys.setprofile(None)
    assert condition_waits == []
    assert cleaned == [True]
    assert pool.workers[0]._exited.done()
