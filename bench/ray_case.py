"""The ``ray`` case: workers in Ray actors, 2 of them in every contender, on a local Ray
runtime that the case starts (``ray.init(address="local", num_cpus=2,
include_dashboard=False)``) and shuts down at the end. Skipped, with the reason printed,
where Ray is not installed.

Contenders:

- bare Ray async actors: 2 actors whose ``async def call(self, fn, *args)`` awaits
  ``fn(*args)``, created with Ray's default options, as a user would write them;
- PortalPool on ``RayHost(num_cpus=1)``, asyncio and trio;
- PortalPool on threads (asyncio), the reference.

The runtime has 2 CPUs and each Ray pool's actor reserves one, so only one Ray pool is
open at a time. The case runs one *phase* per Ray pool; the bare actors (which hold no
CPU once placed: Ray's default for an actor) and the thread pool stay open throughout,
take part in both phases, and their samples from both are put together. Within a phase,
every contender takes turns (round trips) or alternating rounds (throughput, CPU), so a
change in the machine's load falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from time import perf_counter
from typing import Any, Protocol

from portal_pool import PortalPool

from . import process_workloads as work
from .cases import WORKERS, Counts, Figures, latency_figures, rotating_samples, subprocess_env
from .processes import busy_cpu_seconds, tree_cpu_seconds

#: CPUs of the local Ray runtime: one per worker, as on this 2-core machine
RAY_CPUS = 2


class BareActor:
    """A bare Ray async actor: what a user writes without portal_pool. Made a Ray actor
    class at run time (``ray.remote``), so that importing this module imports no Ray."""

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await fn(*args)

    async def call_chunk(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        """One call for many items, which run concurrently in the actor's loop: the
        hand-made chunk a user would write to amortise Ray's per-call cost."""
        return list(await asyncio.gather(*(fn(item) for item in items)))


class RayBenchPool(Protocol):
    """What the case needs of a contender."""

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        """One blocking round trip."""

    def submit_all(self, fn: Callable[..., Any], count: int, *args: Any) -> None:
        """Submit ``count`` calls round robin over the workers, then wait for all."""

    def pinned_all(self, fn: Callable[..., Any], count: int, workers: int, *args: Any) -> None:
        """``count`` calls over the first ``workers`` workers only, then wait for all."""

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        """Map ``fn`` over ``range(count)`` in chunks and drop the results."""

    def shutdown(self) -> None: ...


class BarePool:
    """Bare Ray async actors behind the case's interface."""

    def __init__(self, ray: Any, actor_class: Any, workers: int) -> None:
        self._ray = ray
        self.actors = [actor_class.remote() for _ in range(workers)]
        self._turn = itertools.cycle(self.actors)

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        return self._ray.get(next(self._turn).call.remote(fn, *args))

    def submit_all(self, fn: Callable[..., Any], count: int, *args: Any) -> None:
        self.pinned_all(fn, count, len(self.actors), *args)

    def pinned_all(self, fn: Callable[..., Any], count: int, workers: int, *args: Any) -> None:
        actors = self.actors[:workers]
        refs = [actors[index % workers].call.remote(fn, *args) for index in range(count)]
        self._ray.get(refs)

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        items = range(count)
        chunks = [list(items[start : start + chunksize]) for start in range(0, count, chunksize)]
        refs = [
            self.actors[index % len(self.actors)].call_chunk.remote(fn, chunk)
            for index, chunk in enumerate(chunks)
        ]
        for _ in itertools.chain.from_iterable(self._ray.get(refs)):
            pass

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)


class PortalPoolBench:
    """A PortalPool, on threads or on a RayHost."""

    def __init__(self, pool: PortalPool[Any]) -> None:
        self.pool = pool

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        return self.pool.run(fn, *args)

    def submit_all(self, fn: Callable[..., Any], count: int, *args: Any) -> None:
        futures = [self.pool.submit(fn, *args) for _ in range(count)]
        for future in futures:
            future.result()

    def pinned_all(self, fn: Callable[..., Any], count: int, workers: int, *args: Any) -> None:
        chosen = self.pool.workers[:workers]
        futures = [chosen[index % workers].submit(fn, *args) for index in range(count)]
        for future in futures:
            future.result()

    def map_all(self, fn: Callable[..., Any], count: int, chunksize: int) -> None:
        for _ in self.pool.map(fn, range(count), chunksize=chunksize):
            pass

    def shutdown(self) -> None:
        self.pool.shutdown()


@dataclass(frozen=True)
class RayContender:
    """One column of the Ray table."""

    key: str
    label: str
    #: ``bare``, ``ray`` (PortalPool on a RayHost) or ``threads``
    kind: str
    backend: str = "asyncio"

    @property
    def unavailable(self) -> str | None:
        if self.backend == "trio" and importlib.util.find_spec("trio") is None:
            return "trio is not installed"
        return None

    def open(self, ray: Any, bare_class: Any, workers: int) -> RayBenchPool:
        if self.kind == "bare":
            return BarePool(ray, bare_class, workers)
        if self.kind == "ray":
            from portal_pool.ray import RayHost

            host = RayHost(num_cpus=1)
            return PortalPoolBench(PortalPool(workers, backend=self.backend, host=host))
        return PortalPoolBench(PortalPool(workers, backend=self.backend))

    @contextmanager
    def opened(self, ray: Any, bare_class: Any, workers: int) -> Iterator[RayBenchPool]:
        pool = self.open(ray, bare_class, workers)
        try:
            yield pool
        finally:
            pool.shutdown()


RAY_CONTENDERS: tuple[RayContender, ...] = (
    RayContender("bare", "bare Ray async actors", "bare"),
    RayContender("ray_asyncio", "PortalPool Ray asyncio", "ray", "asyncio"),
    RayContender("ray_trio", "PortalPool Ray trio", "ray", "trio"),
    RayContender("threads", "PortalPool threads asyncio", "threads"),
)


def ray_missing() -> str | None:
    """Why the case cannot run here, or ``None``."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'portal_pool[ray]')"
    return None


# -- the measurements --------------------------------------------------------------------


def _timed(measure: Callable[[], object]) -> float:
    start = perf_counter()
    measure()
    return perf_counter() - start


def _start_seconds(entrant: RayContender, ray: Any, bare_class: Any) -> float:
    """From the constructor (or the actors' ``.remote()``) to one no-op's result from
    each worker."""
    start = perf_counter()
    pool = entrant.open(ray, bare_class, WORKERS)
    try:
        pool.pinned_all(work.noop, WORKERS, WORKERS)
        return perf_counter() - start
    finally:
        pool.shutdown()


@dataclass
class Samples:
    """One contender's samples, gathered over the phases it takes part in."""

    start: list[float]
    round_trips: list[int]
    submit: list[float]
    map: list[float]
    cpu: dict[int, list[tuple[float, float, float | None]]]

    @classmethod
    def empty(cls) -> Samples:
        return cls([], [], [], [], {1: [], 2: []})

    def add(self, other: Samples) -> None:
        """Put ``other``'s samples with these."""
        self.start += other.start
        self.round_trips += other.round_trips
        self.submit += other.submit
        self.map += other.map
        for workers, rounds in other.cpu.items():
            self.cpu[workers] += rounds


def _cpu_round(
    pool: RayBenchPool, workers: int, tasks: int, iterations: int
) -> tuple[float, float, float | None]:
    """Wall time of ``tasks`` CPU coroutines on ``workers`` of the pool's 2 workers, with
    the CPU time of this process tree (the Ray runtime's processes are its descendants)
    and of the rest of the machine meanwhile."""
    busy_before, cpu_before = busy_cpu_seconds(), tree_cpu_seconds()
    wall = _timed(partial(pool.pinned_all, work.spin, tasks, workers, iterations))
    cpu, busy_after = tree_cpu_seconds() - cpu_before, busy_cpu_seconds()
    others = (
        max(0.0, busy_after - busy_before - cpu)
        if busy_after is not None and busy_before is not None
        else None
    )
    return wall, cpu, others


def _phase(
    pools: dict[str, RayBenchPool],
    samples: dict[str, Samples],
    counts: Counts,
    iterations: int,
) -> None:
    """Every figure but the start, for the contenders open in this phase."""
    for pool in pools.values():  # warm-up: every worker started, Ray's paths warm
        pool.submit_all(work.noop, counts.warmup // 10)
        pool.map_all(work.noop, counts.chunksize * WORKERS, counts.chunksize)
    calls = {key: partial(pool.run, work.noop) for key, pool in pools.items()}
    turns = replace(
        counts, latency_calls=counts.ray_latency_calls, latency_warmup=counts.ray_latency_warmup
    )
    taken = rotating_samples(calls, turns)
    for key, values in taken.items():
        samples[key].round_trips += values
    for _ in range(counts.repeats):
        for key, pool in pools.items():
            samples[key].submit.append(
                _timed(partial(pool.submit_all, work.noop, counts.ray_noops))
            )
    for _ in range(counts.repeats):
        for key, pool in pools.items():
            samples[key].map.append(
                _timed(partial(pool.map_all, work.noop, counts.noops, counts.chunksize))
            )
    for _ in range(counts.repeats):
        for key, pool in pools.items():
            for workers in (1, 2):
                samples[key].cpu[workers].append(
                    _cpu_round(pool, workers, counts.cpu_tasks, iterations)
                )


def _figures(entrant: RayContender, taken: Samples, counts: Counts) -> Figures:
    figures: Figures = {}
    if taken.start:
        figures |= {"start_s": min(taken.start), "start_samples_s": taken.start}
    if taken.round_trips:
        figures |= latency_figures(taken.round_trips)
    if taken.submit:
        figures |= {
            "submit_items_per_s": counts.ray_noops / min(taken.submit),
            "submit_samples_s": taken.submit,
        }
    if taken.map:
        figures |= {
            "map_items_per_s": counts.noops / min(taken.map),
            "map_samples_s": taken.map,
        }
        if taken.submit:
            figures["map_per_submit"] = figures["map_items_per_s"] / figures["submit_items_per_s"]
    if taken.cpu[1] and taken.cpu[2]:
        one = min(taken.cpu[1])
        two = min(taken.cpu[2])
        figures |= {
            "cpu_one_s": one[0],
            "cpu_two_s": two[0],
            "cpu_speedup": one[0] / two[0],
            "cpu_per_wall": two[1] / two[0],
            "others_cpu_per_wall": None if two[2] is None else two[2] / two[0],
            "cpu_samples_one_s": [sample[0] for sample in taken.cpu[1]],
            "cpu_samples_two_s": [sample[0] for sample in taken.cpu[2]],
        }
    return figures


def _progress(text: str) -> None:
    print(f"  ray {text}", file=sys.stderr, flush=True)


@contextmanager
def local_runtime() -> Iterator[tuple[Any, float]]:
    """Start a local Ray runtime with :data:`RAY_CPUS` CPUs; yield ``ray`` and how long
    ``ray.init`` took; shut it down at the end.

    Ray's processes inherit this environment: ``PYTHONPATH`` is set for the call, so that
    Ray's workers import the same portal_pool and this bench package as this process.
    """
    ray = importlib.import_module("ray")
    if ray.is_initialized():
        raise RuntimeError("a Ray runtime is already running in this process")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]
    try:
        start = perf_counter()
        # address="local": a runtime of its own, even where `ray start` left one running
        # on this machine, which ray.init() would join instead.
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)
        init_s = perf_counter() - start
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield ray, init_s
    finally:
        ray.shutdown()


def measure(counts: Counts) -> dict[str, Figures]:
    """Every figure of every contender that can run here; all ``{"skipped": reason}``
    without Ray."""
    missing = ray_missing()
    if missing is not None:
        _progress(f"skipped: {missing}")
        return {entrant.key: {"skipped": missing} for entrant in RAY_CONTENDERS}
    figures: dict[str, Figures] = {}
    running: list[RayContender] = []
    for entrant in RAY_CONTENDERS:
        reason = entrant.unavailable
        if reason is None:
            running.append(entrant)
        else:
            figures[entrant.key] = {"skipped": reason}
            _progress(f"skipping {entrant.label}: {reason}")
    iterations = max(1, int(work.iterations_per_second() * counts.cpu_task_ms / 1000))
    loadavg_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    samples = {entrant.key: Samples.empty() for entrant in running}
    # The shared contenders' samples of each phase alone, by phase: a Ray pool's ratios
    # are taken against the bare actors' figures from its own phase.
    by_phase: dict[str, dict[str, Samples]] = {}
    errors: dict[str, str] = {}
    with local_runtime() as (ray, init_s):
        _progress(f"ray.init: {init_s:.2f} s")
        bare_class = ray.remote(BareActor)
        # The start figure, in alternating rounds, each pool alone on the runtime's CPUs.
        for _ in range(counts.repeats):
            for entrant in running:
                if entrant.key in errors:
                    continue
                try:
                    samples[entrant.key].start.append(_start_seconds(entrant, ray, bare_class))
                except Exception as exc:  # one failed contender doesn't lose the others
                    errors[entrant.key] = f"{type(exc).__name__}: {exc}"
        _progress("start: " + _shown({key: taken.start for key, taken in samples.items()}))
        always = [entrant for entrant in running if entrant.kind != "ray"]
        phases = [entrant for entrant in running if entrant.kind == "ray"]
        with _open_all(always, ray, bare_class, errors) as shared:
            if not phases:
                _phase(shared, samples, counts, iterations)
            for entrant in phases:
                if entrant.key in errors:
                    continue
                try:
                    with entrant.opened(ray, bare_class, WORKERS) as own:
                        pools = {**shared, entrant.key: own}
                        taken = {key: Samples.empty() for key in pools}
                        _phase(pools, taken, counts, iterations)
                    by_phase[entrant.key] = taken
                    for key, phase_samples in taken.items():
                        samples[key].add(phase_samples)
                except Exception as exc:  # one failed phase doesn't lose the other
                    errors[entrant.key] = f"{type(exc).__name__}: {exc}"
                _progress(f"phase {entrant.label} done")
        loadavg_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for entrant in running:
        figures[entrant.key] = _figures(entrant, samples[entrant.key], counts)
        if entrant.kind != "ray" and by_phase:
            figures[entrant.key]["phases"] = {
                phase: _figures(entrant, taken[entrant.key], counts)
                for phase, taken in by_phase.items()
                if entrant.key in taken
            }
        if entrant.key in errors:
            figures[entrant.key]["error"] = errors[entrant.key]
        _progress(f"{entrant.label}: " + _shown(figures[entrant.key]))
    figures["_setup"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ray_version": importlib.import_module("ray").__version__,
        "ray_cpus": RAY_CPUS,
        "ray_init_s": init_s,
        "loadavg_1m_start": loadavg_start,
        "loadavg_1m_end": loadavg_end,
        "cpu_task_iterations": iterations,
        "cpu_task_ms": counts.cpu_task_ms,
        "cpu_tasks": counts.cpu_tasks,
        "noops": counts.ray_noops,
        "map_items": counts.noops,
    }
    return figures


@contextmanager
def _open_all(
    entrants: list[RayContender], ray: Any, bare_class: Any, errors: dict[str, str]
) -> Iterator[dict[str, RayBenchPool]]:
    pools: dict[str, RayBenchPool] = {}
    try:
        for entrant in entrants:
            try:
                pools[entrant.key] = entrant.open(ray, bare_class, WORKERS)
            except Exception as exc:
                errors[entrant.key] = f"{type(exc).__name__}: {exc}"
        yield pools
    finally:
        for pool in pools.values():
            pool.shutdown()


def _shown(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:,.3f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in values.items()
        # the samples and the per-phase figures stay in the JSON
        if not isinstance(value, (list, dict))
        or key in ("bare", "ray_asyncio", "ray_trio", "threads")
    )
