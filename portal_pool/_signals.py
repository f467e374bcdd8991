"""Keeping Ctrl-C working while threads wait on one another."""

from __future__ import annotations

from collections.abc import Callable

# Python notices a signal only between bytecodes. One that lands after the last check but
# before a thread blocks in a lock is seen when the lock wait ends, which for an unbounded
# wait may be never: the main thread's waits on the pool therefore block in slices this
# long, and each return to Python delivers a pending Ctrl-C. One wake-up per slice per
# waiting thread costs nothing measurable.
#
# The slices are also why worker threads leave their signal mask alone. Python runs signal
# handlers in the main thread only, whichever thread the kernel interrupted; Linux gives a
# process-directed signal to the main thread unless that thread blocks it, and a signal that
# lands on another thread still reaches a waiting main thread within one slice. A blocked
# mask would buy nothing more, and everything a task starts would inherit it: child
# processes that ignore terminate() and Ctrl-C, and threads that outlive the pool, such as
# trio's cached to_thread workers.
SIGNAL_CHECK_INTERVAL = 0.25


def wait_in_slices(wait: Callable[[float], bool]) -> None:
    """Call ``wait(SIGNAL_CHECK_INTERVAL)`` until it returns true."""
    while not wait(SIGNAL_CHECK_INTERVAL):
        pass  # the loop's back edge is where Python runs a pending signal handler
