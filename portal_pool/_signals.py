"""Keeping Ctrl-C working while threads wait on one another."""

from __future__ import annotations

import signal
from collections.abc import Callable

# Python notices a signal only between bytecodes. One that lands after the last check but
# before a thread blocks in a lock is seen when the lock wait ends, which for an unbounded
# wait may be never: the main thread's waits on the pool therefore block in slices this
# long, and each return to Python delivers a pending Ctrl-C. One wake-up per slice per
# waiting thread costs nothing measurable.
SIGNAL_CHECK_INTERVAL = 0.25


def wait_in_slices(wait: Callable[[float], bool]) -> None:
    """Call ``wait(SIGNAL_CHECK_INTERVAL)`` until it returns true."""
    while not wait(SIGNAL_CHECK_INTERVAL):
        pass  # the loop's back edge is where Python runs a pending signal handler


# Signals that are about the process, not about the code a thread runs.
PROCESS_SIGNALS = {
    getattr(signal, name)
    for name in (
        "SIGINT",
        "SIGTERM",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGCHLD",
        "SIGWINCH",
        "SIGPIPE",
    )
    if hasattr(signal, name)
}


def block_process_signals() -> None:
    """Keep process signals off this thread so the kernel delivers them to the main one.

    Python runs signal handlers in the main thread only, but the kernel may deliver a
    signal to any thread that does not block it. A Ctrl-C that lands on a worker thread
    sets Python's flag without waking a main thread blocked in ``future.result()``, and
    Ctrl-C seems ignored until that wait ends. Threads this one starts inherit the mask.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
