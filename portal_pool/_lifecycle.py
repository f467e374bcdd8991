"""The pool's life around the interpreter's: joining workers, exit, Ctrl-C and fork."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from _thread import allocate_lock
from collections.abc import Iterable
from concurrent.futures import Future
from contextlib import suppress
from typing import TYPE_CHECKING, Any, NoReturn

from ._signals import wait_in_slices

if TYPE_CHECKING:
    from ._flow import PendingLimit
    from ._watchdog import StallWatchdog
    from ._worker import Worker

# Workers of every pool not yet joined, for the interpreter-exit hook below.
_live_workers: weakref.WeakSet[Worker[Any]] = weakref.WeakSet()
# Set by that hook. Held while a pool registers its workers, so a pool starting in
# another thread is either seen by the hook or refused.
_exit_lock = threading.Lock()
_exiting = False
EXITING_MESSAGE = (
    "cannot start a PortalPool while the interpreter is exiting (in an atexit handler, "
    "say): nothing would wait for its work to finish; submit the work before the "
    "program ends"
)


def check_not_exiting() -> None:
    """:raises RuntimeError: once the interpreter is exiting"""
    if _exiting:
        raise RuntimeError(EXITING_MESSAGE)


def register_workers(workers: Iterable[Worker[Any]]) -> None:
    """Have the exit hook wait for these workers.

    :raises RuntimeError: once the interpreter is exiting
    """
    with _exit_lock:
        check_not_exiting()
        _live_workers.update(workers)


def close_workers(
    workers: Iterable[Worker[Any]],
    pending_limit: PendingLimit | None,
    watchdog: StallWatchdog | None,
    cancel: bool = False,
) -> None:
    """Stop accepting work everywhere; wake submitters blocked on a full pool."""
    if pending_limit is not None:
        pending_limit.close()
    if watchdog is not None:
        watchdog.stop(wait=False)
    stop_workers(workers, cancel)


def stop_workers(workers: Iterable[Worker[Any]], cancel: bool) -> None:
    for worker in workers:
        worker._request_stop(cancel)


def join_workers(workers: Iterable[Worker[Any]], interrupted_before: bool = False) -> None:
    """Join every worker thread; an interrupt while waiting cancels what is left.

    The first interrupt (Ctrl-C, or an exception from another signal handler) cancels the
    work, waits for its clean-up, then is raised. The second is raised at once: the user
    insists. With ``interrupted_before`` (the wait is itself the consequence of a
    Ctrl-C), the first one here is that second one.
    """
    interrupted: BaseException | None = None
    pending = [worker for worker in workers if worker._host_loop.started()]
    while pending:
        try:
            # Not Thread.join(timeout): up to Python 3.12, an interrupt landing in it
            # marks the thread stopped while it still runs, and nothing waits for it again.
            wait_done(pending[0]._exited)
            pending[0]._host_loop.join()  # it is past its last step: no real wait
        except BaseException as exc:
            if interrupted_before or interrupted is not None:
                raise
            interrupted = exc
            stop_workers(pending, True)
            continue
        _live_workers.discard(pending.pop(0))
    if interrupted is not None:
        raise interrupted


def wait_done(future: Future[Any]) -> None:
    """Block until ``future`` is done, in slices (see _signals), interruptible by Ctrl-C.

    On a plain lock that a done callback releases, not in ``concurrent.futures.wait`` or
    ``future.result``: they park in ``threading.Condition.wait``, where a Ctrl-C raised as
    it has let go of its lock, before its ``try``, leaves that lock released, and the
    wait's exit fails with "release unlocked lock" instead of the KeyboardInterrupt. A
    thread watching this one, as a test does, sends it just then on the free-threaded
    build. A plain lock's acquire is one call: an interrupt lands before or after it.
    """
    done = allocate_lock()
    done.acquire()
    future.add_done_callback(lambda _: done.release())
    wait_in_slices(lambda seconds: bool(done.acquire(True, seconds)))


def _at_interpreter_exit() -> None:
    # Runs before the interpreter joins non-daemon threads. A script that ends normally
    # lets submitted work finish, as ThreadPoolExecutor does; one that is ending on an
    # uncaught Ctrl-C cancels it instead of hanging on it.
    global _exiting
    with _exit_lock:
        _exiting = True  # nothing would wait for the work of a pool started after this
        workers = list(_live_workers)
    if not workers:
        return
    presses = _ctrl_c_presses()
    try:
        stop_workers(workers, presses > 0)
        if presses > 1 and any(worker._host_loop.is_alive() for worker in workers):
            # Ctrl-C came again while the work was being cancelled: stop waiting.
            _end_process(KeyboardInterrupt(), workers)
        join_workers(workers, presses > 0)
    except BaseException as exc:
        # Returning would report success after a Ctrl-C, and the interpreter would go
        # on to wait, without bound, for any worker thread still cleaning up.
        _end_process(exc, workers)


def _ctrl_c_presses() -> int:
    """How many Ctrl-Cs the program is ending on; 0 for a normal end.

    Decided from this exit. ``sys.last_exc`` alone is history: an interactive session
    (the REPL, ``code.InteractiveInterpreter``) sets it for every exception it showed and
    went on after. It describes the exit only outside interactive mode, and only if it
    escaped every frame, as an uncaught exception does: one that Python code caught has a
    traceback starting in a frame that had a caller. A Ctrl-C pressed while the first one
    was being handled (in a ``with`` block's exit, say) is chained to it.
    """
    if hasattr(sys, "ps1"):  # interactive mode: the session ends on EOF or exit()
        return 0
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if not isinstance(last, KeyboardInterrupt):
        return 0
    if last.__traceback__ is None or last.__traceback__.tb_frame.f_back is not None:
        return 0
    presses = 0
    chained: BaseException | None = last
    while chained is not None and presses < 2:
        presses += isinstance(chained, KeyboardInterrupt)
        chained = chained.__context__
    return presses


def _end_process(interrupt: BaseException, workers: Iterable[Worker[Any]]) -> NoReturn:
    """End the process after an interrupt at interpreter exit, as if it were uncaught."""
    stuck = sum(worker._host_loop.is_alive() for worker in workers)
    if stuck:
        what = f"stopped waiting for {stuck} worker{'s' if stuck > 1 else ''}"
    else:
        what = "cancelled the work still running"
    with suppress(Exception):  # stderr may be closed
        print(
            f"{type(interrupt).__name__}: portal_pool {what} at interpreter exit", file=sys.stderr
        )
    for worker in workers:
        with suppress(Exception):
            worker._host_loop.terminate()  # a worker process ends now, not when orphaned
    if not stuck:
        # Nothing of the pool's can hold them up any more: the atexit handlers run, as
        # they would after an uncaught exception.
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    if isinstance(interrupt, KeyboardInterrupt):
        if os.name == "posix":
            # As CPython ends after an uncaught KeyboardInterrupt: killed by SIGINT, so
            # a shell sees status 130 and a calling script stops too.
            with suppress(OSError, ValueError):
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.raise_signal(signal.SIGINT)
            os._exit(130)  # this thread blocks SIGINT
        os._exit(0xC000013A)  # Windows: STATUS_CONTROL_C_EXIT, CPython's status there
    os._exit(_exit_status(interrupt))


def _exit_status(exc: BaseException) -> int:
    """The status Python exits with when ``exc`` is uncaught."""
    if not isinstance(exc, SystemExit):
        return 1
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    with suppress(Exception):
        print(exc.code, file=sys.stderr, flush=True)
    return 1


def _after_fork_in_child() -> None:
    # A forked child has copies of the pools but none of their threads: every copy
    # refuses work and fails what was in flight, instead of accepting work that never
    # runs. The exit hook then has nothing to wait for, and its lock is new: a thread
    # that held the old one at the fork does not exist here.
    global _exit_lock
    _exit_lock = threading.Lock()
    workers = list(_live_workers)
    _live_workers.clear()
    limits = {id(w._pending_limit): w._pending_limit for w in workers if w._pending_limit}
    for limit in limits.values():
        limit._after_fork_in_child()
    for worker in workers:
        worker._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# The same hook ThreadPoolExecutor uses: atexit.register would run only after the
# interpreter has waited for our (non-daemon) threads, that is, never.
threading._register_atexit(_at_interpreter_exit)  # type: ignore[attr-defined]
