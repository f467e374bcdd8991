"""The measurements. Each case opens its contender fresh, waits for every result and
shuts it down before returning, so no case inherits another's threads or backlog."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from time import perf_counter, perf_counter_ns
from typing import Any

import portal_pool
from portal_pool import PortalPool

from . import process_workloads
from .contenders import AsyncFn, BenchPool, Contender, round_trip
from .workloads import bare_loops_sleepers, hash_buffer, noop

WORKERS = 2
#: the latency case's calls are split into this many turns per contender
LATENCY_TURNS = 20
REPO_ROOT = Path(__file__).resolve().parent.parent

Figures = dict[str, Any]


@dataclass(frozen=True)
class Counts:
    """How much work each case does; ``scaled(10)`` is the ``--quick`` variant."""

    noops: int = 30_000
    chunksize: int = 512
    warmup: int = 1_000
    latency_calls: int = 2_000
    latency_warmup: int = 200
    sleepers: int = 20_000
    hashes: int = 200
    repeats: int = 3
    rss_items: int = 1_000_000
    rss_buffersize: int = 1_024
    skew_tasks: int = 500
    #: the processes case: pure-Python CPU tasks, each this long on one core
    cpu_tasks: int = 8
    cpu_task_ms: int = 125
    #: aiomultiprocess polls, so its round trips take milliseconds: fewer of them
    amp_latency_calls: int = 100
    #: the ray case: a Ray call takes about a millisecond, so fewer per-item calls
    ray_noops: int = 3_000
    ray_latency_calls: int = 1_000
    ray_latency_warmup: int = 100

    def scaled(self, divisor: int) -> Counts:
        """Every count divided by ``divisor`` (chunk and buffer sizes stay)."""
        return replace(
            self,
            noops=self.noops // divisor,
            warmup=self.warmup // divisor,
            latency_calls=self.latency_calls // divisor,
            latency_warmup=self.latency_warmup // divisor,
            sleepers=self.sleepers // divisor,
            hashes=self.hashes // divisor,
            rss_items=self.rss_items // divisor,
            skew_tasks=self.skew_tasks // divisor,
            cpu_task_ms=self.cpu_task_ms // divisor,
            amp_latency_calls=self.amp_latency_calls // divisor,
            ray_noops=self.ray_noops // divisor,
            ray_latency_calls=self.ray_latency_calls // divisor,
            ray_latency_warmup=self.ray_latency_warmup // divisor,
        )


def submit_all(pool: BenchPool, fn: AsyncFn, count: int, *args: Any) -> float:
    """Submit ``count`` calls from this thread, wait for all; return the wall time."""
    start = perf_counter()
    futures = [pool.submit(fn, *args) for _ in range(count)]
    for future in futures:
        future.result()
    return perf_counter() - start


def map_all(pool: PortalPool[Any], fn: AsyncFn, count: int, chunksize: int) -> float:
    """Iterate ``pool.map`` over ``range(count)`` without keeping results; return the time."""
    start = perf_counter()
    for _ in pool.map(fn, range(count), chunksize=chunksize):
        pass
    return perf_counter() - start


def _settled() -> None:
    gc.collect()


def best_of(repeats: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    """Run ``measure`` ``repeats`` times (collecting garbage first); the best and all times."""
    samples = []
    for _ in range(repeats):
        _settled()
        samples.append(measure())
    return min(samples), samples


def bench_submit(contender: Contender, counts: Counts) -> Figures:
    """Throughput of per-item submit of no-op coroutines, one submitting thread."""
    with contender.opened(WORKERS) as pool:
        submit_all(pool, noop, counts.warmup)
        seconds, samples = best_of(counts.repeats, lambda: submit_all(pool, noop, counts.noops))
    return {"items_per_s": counts.noops / seconds, "samples_s": samples, "via": "submit"}


def bench_map(contender: Contender, counts: Counts) -> Figures:
    """Throughput of ``map(chunksize)``; per-item submit for contenders without a map."""
    with contender.opened(WORKERS) as pool:
        if isinstance(pool, PortalPool):
            mapper = pool
            map_all(mapper, noop, counts.warmup, counts.chunksize)
            seconds, samples = best_of(
                counts.repeats, lambda: map_all(mapper, noop, counts.noops, counts.chunksize)
            )
            via = f"map(chunksize={counts.chunksize})"
        else:
            submit_all(pool, noop, counts.warmup)
            seconds, samples = best_of(counts.repeats, lambda: submit_all(pool, noop, counts.noops))
            via = "submit"
    return {"items_per_s": counts.noops / seconds, "samples_s": samples, "via": via}


def _percentile(ordered: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def bench_latency(contenders: list[Contender], counts: Counts) -> dict[str, Figures]:
    """Round trips of a no-op, one at a time, after a warm-up; twice where possible.

    First with threads where the kernel puts them, as users run them. On a machine with
    idle cores that figure mostly measures how fast the kernel wakes an idle core, and
    whether a contender's threads share one core or not changes from run to run. Then,
    on Linux, with every thread of the contenders on one core: the cost of the round
    trip's own code, which is stable from run to run.
    """
    figures = {key: dict(values) for key, values in _latency_pass(contenders, counts).items()}
    if hasattr(os, "sched_setaffinity"):
        allowed = os.sched_getaffinity(0)
        # Threads inherit their creator's affinity: pin this thread before the contenders
        # start theirs.
        os.sched_setaffinity(0, {min(allowed)})
        try:
            pinned = _latency_pass(contenders, counts)
        finally:
            os.sched_setaffinity(0, allowed)
        for key, values in pinned.items():
            figures[key].update({f"{name}_one_cpu": value for name, value in values.items()})
    return figures


def _latency_pass(contenders: list[Contender], counts: Counts) -> dict[str, Figures]:
    """Every contender open at once, taking turns (see :func:`rotating_round_trips`)."""
    with ExitStack() as stack:
        calls = {
            contender.key: partial(round_trip(stack.enter_context(contender.opened(WORKERS))), noop)
            for contender in contenders
        }
        return rotating_round_trips(calls, counts)


def rotating_round_trips(
    calls: dict[str, Callable[[], object]], counts: Counts
) -> dict[str, Figures]:
    """Time one blocking round trip of each open contender, taking turns of a slice of
    calls each in a rotating order: a change in the machine's load during the pass falls
    on all of them alike. Idle contenders wait in epoll and take no CPU from the one being
    measured. p50, p99 and mean in µs, by key."""
    taken = rotating_samples(calls, counts)
    return {key: latency_figures(samples) for key, samples in taken.items()}


def rotating_samples(
    calls: dict[str, Callable[[], object]], counts: Counts
) -> dict[str, list[int]]:
    """The round trips of :func:`rotating_round_trips`, in ns, by key."""
    per_turn = max(1, counts.latency_calls // LATENCY_TURNS)
    samples: dict[str, list[int]] = {key: [] for key in calls}
    for call in calls.values():
        for _ in range(counts.latency_warmup):
            call()
    _settled()
    keys = list(calls)
    for turn in range(LATENCY_TURNS):
        shift = turn % len(keys)
        for key in keys[shift:] + keys[:shift]:
            call, bucket = calls[key], samples[key]
            for _ in range(per_turn):
                start = perf_counter_ns()
                call()
                bucket.append(perf_counter_ns() - start)
    return samples


def latency_figures(taken: list[int]) -> Figures:
    """p50, p99 and mean, in µs, of round trips timed in ns."""
    taken = sorted(taken)
    return {
        "p50_us": _percentile(taken, 0.50) / 1000,
        "p99_us": _percentile(taken, 0.99) / 1000,
        "mean_us": sum(taken) / len(taken) / 1000,
        "calls": len(taken),
    }


def bench_sleepers(contender: Contender, counts: Counts) -> Figures:
    """Wall time from the first submit to the last result of tasks that sleep 0.1 s."""
    sleeper = contender.sleeper
    figures: Figures = {}
    with contender.opened(WORKERS) as pool:
        submit_all(pool, noop, counts.warmup)
        figures["submit_s"], figures["submit_samples_s"] = best_of(
            counts.repeats, lambda: submit_all(pool, sleeper, counts.sleepers)
        )
    if contender.is_portal_pool:
        with contender.opened(WORKERS) as mapper:
            assert isinstance(mapper, PortalPool)
            map_all(mapper, noop, counts.warmup, counts.chunksize)
            figures["map_s"], figures["map_samples_s"] = best_of(
                counts.repeats, lambda: map_all(mapper, sleeper, counts.sleepers, counts.chunksize)
            )
    figures["sleeper"] = sleeper.__module__ + "." + sleeper.__qualname__
    if contender.key != "portal":
        # The same sleepers on bare loops in threads, no pool: what the loops themselves
        # cost, so a pool's figure can be read against its backend's floor.
        figures["bare_s"], figures["bare_samples_s"] = best_of(
            counts.repeats,
            lambda: bare_loops_sleepers(contender.loop_kind, WORKERS, counts.sleepers),
        )
    return figures


def _buffers() -> list[bytes]:
    return [os.urandom(1 << 20) for _ in range(4)]


def _hash_on_threads(buffers: list[bytes], count: int, threads: int) -> float:
    """Hash ``count`` buffers split over ``threads`` plain threads; return the wall time."""

    def work(share: range) -> None:
        for index in share:
            hashlib.sha256(buffers[index % len(buffers)]).digest()

    workers = [
        threading.Thread(target=work, args=(range(first, count, threads),))
        for first in range(threads)
    ]
    start = perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return perf_counter() - start


def bench_scaling(contender: Contender, counts: Counts) -> Figures:
    """SHA-256 over 1 MiB buffers on 1 worker and on 2; best of a few alternating runs.

    Each round also times the same hashing on 1 and 2 plain threads, so the figure can be
    read against the scaling the machine allowed at that moment.
    """
    buffers = _buffers()

    def hash_all(pool: BenchPool) -> float:
        start = perf_counter()
        futures = [
            pool.submit(hash_buffer, buffers[index % len(buffers)])
            for index in range(counts.hashes)
        ]
        for future in futures:
            future.result()
        return perf_counter() - start

    best = {"one": math.inf, "two": math.inf, "threads_one": math.inf, "threads_two": math.inf}
    with contender.opened(1) as one, contender.opened(2) as two:
        for pool in (one, two):
            submit_all(pool, hash_buffer, 4, buffers[0])  # warm-up
        _settled()
        for _ in range(counts.repeats):
            rounds: dict[str, Callable[[], float]] = {
                "one": lambda: hash_all(one),
                "two": lambda: hash_all(two),
                "threads_one": lambda: _hash_on_threads(buffers, counts.hashes, 1),
                "threads_two": lambda: _hash_on_threads(buffers, counts.hashes, 2),
            }
            for name, measure in rounds.items():
                best[name] = min(best[name], measure())
    return {
        "one_s": best["one"],
        "two_s": best["two"],
        "speedup": best["one"] / best["two"],
        "threads_speedup": best["threads_one"] / best["threads_two"],
    }


def _spin_on_threads(iterations: int, tasks: int, threads: int) -> float:
    """``tasks`` pure-Python loops split over ``threads`` plain threads; the wall time."""

    def work(share: range) -> None:
        for _ in share:
            process_workloads._spin(iterations)

    workers = [
        threading.Thread(target=work, args=(range(first, tasks, threads),))
        for first in range(threads)
    ]
    start = perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return perf_counter() - start


def bench_cpu(contender: Contender, counts: Counts) -> Figures:
    """``cpu_tasks`` pure-Python CPU coroutines (about ``cpu_task_ms`` each, never
    awaiting) on 1 worker and on 2: best of a few alternating rounds.

    With the GIL the loops take turns and 2 workers gain nothing; on a free-threaded
    build each loop computes on its own core. Beside the speedup: the process's CPU
    seconds ÷ wall seconds in the best 2-worker round (2.00: both workers computed
    throughout), the 1-minute load average after the rounds (anything near 1 or more:
    another process shared the cores), and the same loops on 1 vs 2 plain threads in
    the same rounds (what the machine and the interpreter allowed then).
    """
    iterations = _cpu_task_iterations(counts)
    best: dict[str, tuple[float, float]] = {}
    samples: dict[str, list[float]] = {"one": [], "two": []}
    with contender.opened(1) as one, contender.opened(2) as two:
        for pool in (one, two):
            submit_all(pool, process_workloads.spin, 2, 1_000)  # warm-up
        for _ in range(counts.repeats):
            for name, pool in (("one", one), ("two", two)):
                _settled()
                cpu_before = time.process_time()
                wall = submit_all(pool, process_workloads.spin, counts.cpu_tasks, iterations)
                cpu = time.process_time() - cpu_before
                samples[name].append(wall)
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu)
            for threads in (1, 2):
                wall = _spin_on_threads(iterations, counts.cpu_tasks, threads)
                key = f"threads_{threads}"
                best[key] = min(best.get(key, (math.inf, 0.0)), (wall, 0.0))
    return {
        "one_s": best["one"][0],
        "two_s": best["two"][0],
        "speedup": best["one"][0] / best["two"][0],
        "cpu_per_wall": best["two"][1] / best["two"][0],
        "cpu_per_wall_one": best["one"][1] / best["one"][0],
        "threads_speedup": best["threads_1"][0] / best["threads_2"][0],
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "free_threaded": not _gil_enabled(),
        "iterations": iterations,
        "samples_one_s": samples["one"],
        "samples_two_s": samples["two"],
    }


_ITERATIONS: dict[int, int] = {}


def _cpu_task_iterations(counts: Counts) -> int:
    """Loop iterations that take about ``cpu_task_ms`` on one core, measured once per run
    so that every contender gets the same work."""
    if counts.cpu_task_ms not in _ITERATIONS:
        per_second = process_workloads.iterations_per_second()
        _ITERATIONS[counts.cpu_task_ms] = max(1, int(per_second * counts.cpu_task_ms / 1000))
    return _ITERATIONS[counts.cpu_task_ms]


def _gil_enabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def bench_rss(contender: Contender, counts: Counts) -> Figures | None:
    """Peak RSS growth of a bounded ``map`` over many items, in a fresh subprocess."""
    if not contender.is_portal_pool:
        return None
    return run_rss_probe(
        contender.backend or "asyncio", contender.backend_options, "thread", counts, timeout=900
    )


def run_rss_probe(
    backend: str, options: dict[str, Any], host: str, counts: Counts, timeout: float
) -> Figures:
    """Run ``bench/rss_probe.py`` in a fresh interpreter and return its figures."""
    command = [
        sys.executable,
        "-m",
        "bench.rss_probe",
        backend,
        json.dumps(options),
        str(counts.rss_items),
        str(counts.rss_buffersize),
        host,
    ]
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rss probe failed ({done.returncode}): {done.stderr.strip()}")
    figures: Figures = json.loads(done.stdout)
    return figures


def subprocess_env() -> dict[str, str]:
    """The environment for a probe subprocess: it must import the same portal_pool as this
    process, and this bench package."""
    library = str(Path(portal_pool.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(filter(None, [library, str(REPO_ROOT), env.get("PYTHONPATH")]))
    )
    return env


def _blocking_call(seconds: float) -> None:
    """A sync call that holds its worker's loop, as a blocking library call would."""
    time.sleep(seconds)


def bench_skew(contender: Contender, counts: Counts) -> Figures | None:
    """round_robin vs least_loaded on a skewed stream: 10% of tasks are 100 times longer.

    Tasks arrive one per 2 ms; each blocks its loop for 0.2 ms or, for a seeded random
    10%, 20 ms (100 times longer): about 55% of the two loops' capacity. Round robin
    keeps feeding a loop stuck on a long task; least loaded sees that loop's queue grow
    and goes elsewhere. Reports the p99 time from submit to result, and the time until
    the last result.
    """
    if not contender.is_portal_pool:
        return None
    figures: Figures = {}
    for schedule in ("round_robin", "least_loaded"):
        durations = random.Random(7)
        latencies: list[float] = []
        with _portal_pool(contender, schedule=schedule) as pool:
            futures = []
            start = perf_counter()
            for _ in range(counts.skew_tasks):
                seconds = 0.02 if durations.random() < 0.1 else 0.0002
                submitted = perf_counter()
                future = pool.submit(_blocking_call, seconds)
                future.add_done_callback(partial(_record_latency, latencies, submitted))
                futures.append(future)
                time.sleep(0.002)
            for future in futures:
                future.result()
            tail = perf_counter() - start
        latencies.sort()
        figures[f"{schedule}_p99_ms"] = _percentile_f(latencies, 0.99) * 1000
        figures[f"{schedule}_tail_s"] = tail
    return figures


def _portal_pool(contender: Contender, **options: Any) -> PortalPool[Any]:
    return PortalPool(
        WORKERS,
        backend=contender.backend or "asyncio",
        backend_options=contender.backend_options,
        **options,
    )


def _record_latency(latencies: list[float], submitted: float, _: Future[Any]) -> None:
    latencies.append(perf_counter() - submitted)


def _percentile_f(ordered: list[float], fraction: float) -> float:
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def bench_limits(contender: Contender, counts: Counts) -> Figures | None:
    """What max_concurrency, max_pending and the stall watchdog cost: submit throughput
    with each limit set high enough never to bind (and no stall to report), against the
    plain pool, in alternating rounds."""
    if not contender.is_portal_pool:
        return None
    settings: dict[str, dict[str, float]] = {
        "unlimited": {},
        "max_concurrency": {"max_concurrency": 1_000},
        "max_pending": {"max_pending": 2 * counts.noops},
        "watchdog": {"stall_timeout": 0.2},
    }
    best: dict[str, float] = {}
    pools = {name: _portal_pool(contender, **extra) for name, extra in settings.items()}
    try:
        for pool in pools.values():
            submit_all(pool, noop, counts.warmup)
        # Five alternating rounds: the difference sought is smaller than the noise of one.
        for _ in range(max(counts.repeats, 5)):
            for name, pool in pools.items():
                _settled()
                seconds = submit_all(pool, noop, counts.noops)
                best[name] = min(best.get(name, seconds), seconds)
    finally:
        for pool in pools.values():
            pool.shutdown()
    unlimited = counts.noops / best["unlimited"]
    return {
        "unlimited_items_per_s": unlimited,
        "max_concurrency_ratio": counts.noops / best["max_concurrency"] / unlimited,
        "max_pending_ratio": counts.noops / best["max_pending"] / unlimited,
        "watchdog_ratio": counts.noops / best["watchdog"] / unlimited,
    }


def bench_processes(counts: Counts) -> dict[str, Figures]:
    """Workers in child processes: PortalPool's process host, ``ProcessPoolExecutor``,
    aiomultiprocess and PortalPool on threads (``bench/processes.py``)."""
    from .processes import measure  # it imports this module: loaded on first use

    return measure(counts)


def bench_ray(counts: Counts) -> dict[str, Figures]:
    """Workers in Ray actors: PortalPool's Ray host, bare Ray async actors and PortalPool
    on threads, on a local Ray runtime the case starts (``bench/ray_case.py``)."""
    from .ray_case import measure  # it imports this module: loaded on first use

    return measure(counts)


def bench_failures(counts: Counts) -> dict[str, Figures]:
    """What a child's death, Ctrl-C, an unpicklable argument and ``cancel()`` do to each
    process pool (``bench/failures.py``). Nothing in it scales with ``counts``."""
    from .failures import measure

    return measure()


Case = Callable[[Contender, Counts], Figures | None]
#: A case that measures every contender together and returns figures by contender key.
GroupCase = Callable[[list[Contender], Counts], dict[str, Figures]]
#: A case with contenders of its own, not the ones in contenders.py; figures by their key.
OwnCase = Callable[[Counts], dict[str, Figures]]

#: name -> (what it measures, function), in the order they run
CASES: dict[str, tuple[str, Case | GroupCase | OwnCase]] = {
    "submit": ("submit throughput", bench_submit),
    "map": ("map throughput", bench_map),
    "latency": ("round-trip latency", bench_latency),
    "sleepers": ("sleepers wall time", bench_sleepers),
    "scaling": ("2-vs-1 worker scaling", bench_scaling),
    "cpu": ("pure-Python CPU coroutines, 1 -> 2 workers", bench_cpu),
    "rss": ("bounded map peak RSS", bench_rss),
    "skew": ("least_loaded vs round_robin on a skewed load", bench_skew),
    "limits": ("cost of max_concurrency and max_pending", bench_limits),
    "processes": ("workers in child processes", bench_processes),
    "ray": ("workers in Ray actors, on a local Ray runtime", bench_ray),
    "failures": ("what happens when a child dies, Ctrl-C, ...", bench_failures),
}
#: the cases that are GroupCases
GROUP_CASES = frozenset({"latency"})
#: the cases that are OwnCases
OWN_CASES = frozenset({"processes", "ray", "failures"})
