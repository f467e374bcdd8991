"""The seed scenario: a few event loops in threads, each running a few sleeping tasks at once.

Shared by ``python -m portal_pool`` and ``examples/seed_three_loops.py``. Nothing here
prints: the command-line front ends do.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._backends import check_backend
from ._pool import PortalPool

DEFAULT_WORKERS = 3
DEFAULT_TASKS_PER_WORKER = 3
DEFAULT_DELAY = 1.0


@dataclass(frozen=True)
class SeedOptions:
    """What to run: the pool's backend and the shape of the work.

    :param backend: ``"asyncio"`` or ``"trio"``
    :param backend_options: passed to the pool, e.g. ``{"use_uvloop": True}``
    :param workers: number of event loops, one per thread
    :param tasks_per_worker: tasks pinned to each loop, all sleeping at the same time
    :param delay: seconds each task sleeps
    """

    backend: str = "asyncio"
    backend_options: dict[str, Any] = field(default_factory=dict[str, Any])
    workers: int = DEFAULT_WORKERS
    tasks_per_worker: int = DEFAULT_TASKS_PER_WORKER
    delay: float = DEFAULT_DELAY


@dataclass(frozen=True)
class SeedRun:
    """The outcome of one run.

    :param results: each task's return value, worker by worker
    :param elapsed: seconds from creating the pool to its shutdown
    """

    results: list[str]
    elapsed: float

    def format(self) -> str:
        """The results, one per line, then the elapsed time."""
        lines = [*self.results, f"elapsed: {self.elapsed:.2f} s"]
        return "\n".join(lines)


async def report_thread(delay: float) -> str:
    """Sleep on whichever backend runs this task, then name the thread that ran it.

    :param delay: seconds to sleep
    """
    await anyio.sleep(delay)
    return f"return value from {threading.current_thread().name}"


def run_seed(options: SeedOptions) -> SeedRun:
    """Run ``tasks_per_worker`` tasks in each of ``workers`` loops and time the whole.

    The tasks of one loop sleep concurrently and the loops run in parallel, so the run
    takes about one ``delay``, whatever the number of tasks.

    :param options: the backend and the shape of the work
    """
    start = time.perf_counter()
    pool: PortalPool[None] = PortalPool(
        options.workers, backend=options.backend, backend_options=options.backend_options
    )
    with pool:
        # Pinned rather than round robin, so that every loop gets its share whatever
        # the pool's scheduling policy.
        futures = [
            worker.submit(report_thread, options.delay)
            for worker in pool.workers
            for _ in range(options.tasks_per_worker)
        ]
        results = [future.result() for future in futures]
    return SeedRun(results, time.perf_counter() - start)


def add_seed_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the scenario's options: ``--backend``, ``--uvloop``, ``--workers``, and so on.

    :param parser: the parser to extend
    """
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="event loop of every worker thread (default: %(default)s)",
    )
    parser.add_argument("--uvloop", action="store_true", help="run the asyncio loops on uvloop")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="number of event-loop threads (default: %(default)s)",
    )
    parser.add_argument(
        "--tasks-per-worker",
        type=_positive_int,
        default=DEFAULT_TASKS_PER_WORKER,
        metavar="N",
        help="tasks sleeping at the same time in each loop (default: %(default)s)",
    )
    parser.add_argument(
        "--delay",
        type=_non_negative_float,
        default=DEFAULT_DELAY,
        metavar="SECONDS",
        help="how long each task sleeps (default: %(default)s)",
    )


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SeedOptions:
    """Check the parsed options together and turn them into :class:`SeedOptions`.

    A bad combination or a missing backend package ends the program through
    ``parser.error``, before any thread starts.

    :param parser: the parser that produced ``args``, for its error reporting
    :param args: options added by :func:`add_seed_arguments`
    """
    if args.uvloop and args.backend != "asyncio":
        parser.error("--uvloop needs --backend asyncio")
    backend_options = {"use_uvloop": True} if args.uvloop else {}
    try:
        check_backend(args.backend, backend_options)
    except ImportError as exc:
        parser.error(str(exc))
    return SeedOptions(
        backend=args.backend,
        backend_options=backend_options,
        workers=args.workers,
        tasks_per_worker=args.tasks_per_worker,
        delay=args.delay,
    )


def _positive_int(text: str) -> int:
    error = argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise error from None
    if value < 1:
        raise error
    return value


def _non_negative_float(text: str) -> float:
    error = argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    try:
        value = float(text)
    except ValueError:
        raise error from None
    # Written so that "nan" fails too: it compares false with everything.
    if not value >= 0:
        raise error
    return value
