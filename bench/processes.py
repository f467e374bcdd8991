"""The ``processes`` case: workers in child processes, 2 of them in every contender.

PortalPool on its process host (asyncio and trio) against ``ProcessPoolExecutor``
(forkserver) and aiomultiprocess, with PortalPool on threads as the reference. The
PortalPool process contenders run once ``PortalPool`` takes the keyword arguments in
:data:`PROCESS_HOST`; until then they are skipped with a printed reason.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.context import BaseContext
from pathlib import Path
from time import perf_counter, perf_counter_ns
from typing import Any, NamedTuple, Protocol

from portal_pool import PortalPool

from . import process_workloads as work
from .cases import (
    REPO_ROOT,
    WORKERS,
    Counts,
    Figures,
    best_of,
    latency_figures,
    rotating_round_trips,
    run_rss_probe,
    subprocess_env,
)

#: The keyword arguments that put PortalPool's workers in child processes. If the process
#: host ends up spelled otherwise, this is the one line to change.
PROCESS_HOST: dict[str, Any] = {"host": "process"}

#: aiomultiprocess round trips take milliseconds (it polls): fewer of them
AMP_LATENCY_WARMUP = 10


def process_host_missing() -> str | None:
    """Why PortalPool cannot run its workers in processes here, or ``None`` if it can."""
    parameters = inspect.signature(PortalPool).parameters
    for name in PROCESS_HOST:
        if name not in parameters:
            return f"PortalPool has no `{name}=` parameter yet"
    return None


def start_context() -> BaseContext:
    """forkserver where the platform has it, else spawn; never fork (the parent has
    threads)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# -- the contenders, behind one blocking interface ---------------------------------------


class ProcessBenchPool(Protocol):
    """What the case needs of a contender."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]: ...

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any: ...

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        """Map ``fn`` over ``range(count)`` and drop the results."""

    def shutdown(self) -> None: ...


class ExecutorPool:
    """``ProcessPoolExecutor`` on :func:`start_context`."""

    def __init__(self, workers: int) -> None:
        self.executor = ProcessPoolExecutor(workers, mp_context=start_context())

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        return self.executor.submit(fn, *args)

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        return self.executor.submit(fn, *args).result()

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        for _ in self.executor.map(fn, range(count), chunksize=chunksize):
            pass

    def shutdown(self) -> None:
        self.executor.shutdown()


class PortalPoolBench:
    """A PortalPool on threads, or on whatever host ``host`` selects."""

    def __init__(self, workers: int, backend: str, host: dict[str, Any]) -> None:
        self.pool: PortalPool[Any] = PortalPool(workers, backend=backend, **host)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        return self.pool.submit(fn, *args)

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        return self.pool.run(fn, *args)

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        for _ in self.pool.map(fn, range(count), chunksize=chunksize):
            pass

    def shutdown(self) -> None:
        self.pool.shutdown()


class AmpPool:
    """``aiomultiprocess.Pool`` behind a blocking interface.

    The pool must be created and awaited in a running asyncio loop, so it lives on a loop
    in a thread of its own; ``submit`` is ``run_coroutine_threadsafe(pool.apply(...))``.
    aiomultiprocess has no ``chunksize``: ``map_all`` sends one item per task.
    """

    def __init__(self, workers: int, options: dict[str, Any]) -> None:
        import aiomultiprocess

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bench-aiomultiprocess", daemon=True
        )
        self._thread.start()
        try:
            self.pool = self._wait(self._open(aiomultiprocess.Pool, workers, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _open(factory: Any, workers: int, options: dict[str, Any]) -> Any:
        return factory(processes=workers, **options)

    def _wait(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(self.pool.apply(fn, args), self._loop)

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        return self.submit(fn, *args).result()

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        self._wait(self._map(fn, count))

    async def _map(self, fn: Callable[..., Any], count: int) -> None:
        await self.pool.map(fn, range(count))

    async def _close(self) -> None:
        self.pool.close()
        await self.pool.join()

    def shutdown(self) -> None:
        try:
            self._wait(self._close())
        finally:
            self._stop_loop()
            # Each queue's feeder thread in this process ends once the queue is closed.
            for queues in self.pool.queues.values():
                for queue in queues:
                    queue.close()
                    queue.join_thread()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


ALL_FIGURES = frozenset({"start", "submit", "map", "latency", "cpu"})
#: the process host's contenders also get the peak-RSS figure of a long bounded map
PROCESS_HOST_FIGURES = ALL_FIGURES | {"rss"}


@dataclass(frozen=True)
class ProcessContender:
    """One column of the Processes table."""

    key: str
    label: str
    #: ``executor``, ``amp`` or ``portal_pool``
    kind: str
    backend: str = "asyncio"
    #: PortalPool's host keyword arguments; empty for its default thread host
    host: dict[str, Any] = field(default_factory=dict)
    #: ``aiomultiprocess.Pool`` options
    options: dict[str, Any] = field(default_factory=dict)
    #: the figures measured for this contender
    measures: frozenset[str] = ALL_FIGURES

    @property
    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or ``None``."""
        if self.kind == "amp" and importlib.util.find_spec("aiomultiprocess") is None:
            return "aiomultiprocess is not installed"
        if self.kind == "portal_pool":
            if self.backend == "trio" and importlib.util.find_spec("trio") is None:
                return "trio is not installed"
            if self.host:
                return process_host_missing()
        return None

    @property
    def runs_coroutines(self) -> bool:
        """``False`` for ``ProcessPoolExecutor``: it runs plain functions, one at a time per
        worker."""
        return self.kind != "executor"

    @property
    def noop(self) -> Callable[..., Any]:
        return work.noop if self.runs_coroutines else work.noop_sync

    @property
    def spin(self) -> Callable[..., Any]:
        return work.spin if self.runs_coroutines else work.spin_sync

    @property
    def marked_sleep(self) -> Callable[..., Any]:
        return work.marked_sleep if self.runs_coroutines else work.marked_sleep_sync

    def open(self, workers: int) -> ProcessBenchPool:
        """Start the contender with ``workers`` workers."""
        if self.kind == "executor":
            return ExecutorPool(workers)
        if self.kind == "amp":
            return AmpPool(workers, self.options)
        return PortalPoolBench(workers, self.backend, self.host)

    @contextmanager
    def opened(self, workers: int) -> Iterator[ProcessBenchPool]:
        """Open, yield, and always shut down."""
        pool = self.open(workers)
        try:
            yield pool
        finally:
            pool.shutdown()


PROCESS_CONTENDERS: tuple[ProcessContender, ...] = (
    ProcessContender("executor", "ProcessPoolExecutor", "executor"),
    ProcessContender(
        "amp", "aiomultiprocess", "amp", measures=frozenset({"start", "map", "latency", "cpu"})
    ),
    ProcessContender(
        "amp_tuned",
        "aiomultiprocess childconcurrency=1",
        "amp",
        options={"childconcurrency": 1},
        measures=frozenset({"cpu"}),
    ),
    ProcessContender(
        "process_asyncio",
        "PortalPool process asyncio",
        "portal_pool",
        "asyncio",
        PROCESS_HOST,
        measures=PROCESS_HOST_FIGURES,
    ),
    ProcessContender(
        "process_trio",
        "PortalPool process trio",
        "portal_pool",
        "trio",
        PROCESS_HOST,
        measures=PROCESS_HOST_FIGURES,
    ),
    ProcessContender("threads", "PortalPool threads asyncio", "portal_pool", "asyncio"),
)


def contender(key: str) -> ProcessContender:
    """The contender with this key."""
    for candidate in PROCESS_CONTENDERS:
        if candidate.key == key:
            return candidate
    raise KeyError(key)


# -- CPU time of this process and its descendants ----------------------------------------


class ProcessInfo(NamedTuple):
    """One process, as /proc/PID/stat shows it."""

    parent: int
    group: int
    state: str
    ticks: int


def process_table() -> dict[int, ProcessInfo]:
    """Every process in /proc by pid (empty where there is no /proc)."""
    table: dict[int, ProcessInfo] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # it exited meanwhile
        # The fields after the command name, which may hold spaces and parentheses:
        # state, ppid, pgrp, ..., utime (the 12th), stime.
        rest = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = ProcessInfo(
            int(rest[1]), int(rest[2]), rest[0], int(rest[11]) + int(rest[12])
        )
    return table


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every descendant alive now.

    ``os.times()`` and ``RUSAGE_CHILDREN`` count only children that have exited and been
    waited for, which a pool's workers have not; so on Linux this reads /proc. Elsewhere it
    falls back to ``os.times()`` (this process, and reaped children only).
    """
    table = process_table()
    if os.getpid() not in table:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.parent, []).append(pid)
    ticks, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        ticks += table[pid].ticks
        stack += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (stolen by the hypervisor included),
    from /proc/stat; ``None`` where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal (guest time is inside user)
    user, nice, system, _, _, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# -- the measurements --------------------------------------------------------------------


def _timed(measure: Callable[[], object]) -> float:
    start = perf_counter()
    measure()
    return perf_counter() - start


def _submit_all(pool: ProcessBenchPool, fn: Callable[..., Any], count: int, *args: Any) -> None:
    futures = [pool.submit(fn, *args) for _ in range(count)]
    for future in futures:
        future.result()


def measure_start(entrant: ProcessContender, counts: Counts) -> Figures:
    """From the pool's constructor to the results of one no-op per worker, in a fresh
    interpreter each time (so a forkserver starts inside the timing too)."""
    samples = []
    for _ in range(counts.repeats):
        done = subprocess.run(
            [sys.executable, "-m", "bench.process_start", entrant.key],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"start probe failed ({done.returncode}): {done.stderr.strip()}")
        samples.append(float(json.loads(done.stdout)["seconds"]))
    return {"start_s": min(samples), "start_samples_s": samples}


def measure_submit(entrant: ProcessContender, counts: Counts) -> Figures:
    """Per-item submit of no-ops from one thread, waiting for all."""
    with entrant.opened(WORKERS) as pool:
        _submit_all(pool, entrant.noop, counts.warmup)
        seconds, samples = best_of(
            counts.repeats, lambda: _timed(partial(_submit_all, pool, entrant.noop, counts.noops))
        )
    return {"submit_items_per_s": counts.noops / seconds, "submit_samples_s": samples}


def measure_map(entrant: ProcessContender, counts: Counts) -> Figures:
    """``map`` over no-ops with ``chunksize`` (aiomultiprocess has none)."""
    with entrant.opened(WORKERS) as pool:
        pool.map_all(entrant.noop, counts.warmup, counts.chunksize)
        seconds, samples = best_of(
            counts.repeats,
            lambda: _timed(partial(pool.map_all, entrant.noop, counts.noops, counts.chunksize)),
        )
    return {"map_items_per_s": counts.noops / seconds, "map_samples_s": samples}


def measure_latencies(entrants: list[ProcessContender], counts: Counts) -> dict[str, Figures]:
    """Round trips of a no-op: every contender open at once, taking turns."""
    with ExitStack() as stack:
        calls: dict[str, Callable[[], object]] = {}
        for entrant in entrants:
            pool = stack.enter_context(entrant.opened(WORKERS))
            calls[entrant.key] = partial(pool.run, entrant.noop)
        return rotating_round_trips(calls, counts)


def measure_polled_latency(entrant: ProcessContender, counts: Counts) -> Figures:
    """Round trips on aiomultiprocess, alone: both its sides poll every 5 ms, which would
    load the others' turns, and a round trip takes milliseconds, so it gets fewer calls."""
    taken: list[int] = []
    with entrant.opened(WORKERS) as pool:
        for _ in range(AMP_LATENCY_WARMUP):
            pool.run(entrant.noop)
        for _ in range(counts.amp_latency_calls):
            start = perf_counter_ns()
            pool.run(entrant.noop)
            taken.append(perf_counter_ns() - start)
    return latency_figures(taken)


def measure_cpu(entrant: ProcessContender, counts: Counts, iterations: int) -> Figures:
    """``cpu_tasks`` pure-Python tasks on 1 worker and on 2, in alternating rounds; the
    best of each, and for the best 2-worker round the CPU/wall ratio of this process and
    its descendants, and of everything else on the machine (other processes, the
    hypervisor's steal)."""
    best: dict[int, tuple[float, float, float | None]] = {}
    samples: dict[int, list[float]] = {1: [], 2: []}
    with entrant.opened(1) as one, entrant.opened(2) as two:
        for pool, workers in ((one, 1), (two, 2)):
            # Start every worker (ProcessPoolExecutor starts them on demand).
            _submit_all(pool, entrant.spin, workers, 1_000)
        for _ in range(counts.repeats):
            for pool, workers in ((one, 1), (two, 2)):
                gc.collect()
                busy_before, cpu_before = busy_cpu_seconds(), tree_cpu_seconds()
                wall = _timed(
                    partial(_submit_all, pool, entrant.spin, counts.cpu_tasks, iterations)
                )
                cpu, busy_after = tree_cpu_seconds() - cpu_before, busy_cpu_seconds()
                others = (
                    max(0.0, busy_after - busy_before - cpu)
                    if busy_after is not None and busy_before is not None
                    else None
                )
                samples[workers].append(wall)
                if workers not in best or wall < best[workers][0]:
                    best[workers] = (wall, cpu, others)
        loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu_one_s": best[1][0],
        "cpu_two_s": best[2][0],
        "cpu_speedup": best[1][0] / best[2][0],
        "cpu_per_wall_one": best[1][1] / best[1][0],
        "cpu_per_wall": best[2][1] / best[2][0],
        "others_cpu_per_wall": None if best[2][2] is None else best[2][2] / best[2][0],
        "cpu_loadavg_1m": loadavg,
        "cpu_samples_one_s": samples[1],
        "cpu_samples_two_s": samples[2],
    }


def measure_rss(entrant: ProcessContender, counts: Counts) -> Figures:
    """Peak RSS growth of the parent (and of each child) over a ``map`` of
    ``counts.rss_items`` no-ops with ``buffersize=counts.rss_buffersize``, in a fresh
    interpreter (``bench/rss_probe.py``), so nothing else this run did counts toward it."""
    host = str(entrant.host.get("host", "thread"))
    probe = run_rss_probe(entrant.backend, {}, host, counts, timeout=600)
    return {f"rss_{name}": value for name, value in probe.items()}


def _progress(entrant: ProcessContender, figures: Figures) -> None:
    shown = ", ".join(
        f"{key}={value:,.3f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in figures.items()
        if not isinstance(value, list)  # the samples, each child's RSS
    )
    print(f"  processes {entrant.label:<36} {shown}", file=sys.stderr, flush=True)


def _guarded(
    figures: dict[str, Figures],
    entrants: list[ProcessContender],
    name: str,
    step: Callable[[], dict[str, Figures]],
) -> None:
    """Run one step for ``entrants``; on an exception record ``<name>_error`` for each."""
    try:
        found = step()
    except Exception as exc:  # one failed figure doesn't lose the others
        error = f"{type(exc).__name__}: {exc}"
        found = {entrant.key: {f"{name}_error": error} for entrant in entrants}
    for entrant in entrants:
        figures[entrant.key].update(found[entrant.key])
        _progress(entrant, found[entrant.key])


def _alone(entrant: ProcessContender, step: Callable[[], Figures]) -> dict[str, Figures]:
    return {entrant.key: step()}


def measure(counts: Counts) -> dict[str, Figures]:
    """Every figure of every contender that can run here; a skipped contender's figures are
    ``{"skipped": reason}``."""
    figures: dict[str, Figures] = {}
    running: list[ProcessContender] = []
    for entrant in PROCESS_CONTENDERS:
        reason = entrant.unavailable
        if reason is None:
            figures[entrant.key] = {}
            running.append(entrant)
        else:
            figures[entrant.key] = {"skipped": reason}
            print(f"  processes: skipping {entrant.label}: {reason}", file=sys.stderr, flush=True)

    def which(name: str) -> list[ProcessContender]:
        return [entrant for entrant in running if name in entrant.measures]

    steps: list[tuple[str, Callable[..., Figures]]] = [
        ("start", measure_start),
        ("submit", measure_submit),
        ("map", measure_map),
        ("rss", measure_rss),
    ]
    for name, step in steps:
        for entrant in which(name):
            _guarded(
                figures, [entrant], name, partial(_alone, entrant, partial(step, entrant, counts))
            )
    together = [entrant for entrant in which("latency") if entrant.kind != "amp"]
    if together:
        _guarded(figures, together, "latency", partial(measure_latencies, together, counts))
    for entrant in which("latency"):
        if entrant.kind == "amp":
            step = partial(measure_polled_latency, entrant, counts)
            _guarded(figures, [entrant], "latency", partial(_alone, entrant, step))
    iterations = max(1, int(work.iterations_per_second() * counts.cpu_task_ms / 1000))
    for entrant in which("cpu"):
        step = partial(measure_cpu, entrant, counts, iterations)
        _guarded(figures, [entrant], "cpu", partial(_alone, entrant, step))
    figures["_setup"] = {
        "start_method": start_context().get_start_method(),
        "cpu_task_iterations": iterations,
        "cpu_task_ms": counts.cpu_task_ms,
        "cpu_tasks": counts.cpu_tasks,
    }
    return figures
