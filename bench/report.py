"""Turning results into the markdown table, the targets check, JSON, README and chart."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .cases import LATENCY_TURNS, Counts
from .contenders import Contender
from .processes import PROCESS_CONTENDERS
from .ray_case import RAY_CONTENDERS

#: results[case][contender key] -> that case's figures for that contender
Results = dict[str, dict[str, dict[str, Any]]]

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
WORKERS_NOTE = "2 "
TIMES = "\N{MULTIPLICATION SIGN}"


# -- machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _library_state() -> str:
    """Which portal_pool was measured: the repo's commit (``+dirty`` if portal_pool/ has
    uncommitted changes), or the directory it was imported from."""
    import portal_pool

    library = Path(portal_pool.__file__).resolve().parent
    root = Path(__file__).resolve().parent.parent
    if library.parent != root:
        return f"from {library}"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "portal_pool")
    except (OSError, subprocess.SubprocessError):
        return "from this checkout"
    return "at " + commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, and when."""
    import portal_pool

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "gil": "free-threaded" if not getattr(sys, "_is_gil_enabled", lambda: True)() else "GIL",
        "packages": {
            "portal_pool": portal_pool.__version__,
            "portal_pool_source": _library_state(),
            "anyio": _version("anyio"),
            "trio": _version("trio"),
            "uvloop": _version("uvloop"),
            "aiomultiprocess": _version("aiomultiprocess"),
            "ray": _version("ray"),
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# -- targets -----------------------------------------------------------------------------


def _get(results: Results, case: str, key: str, field: str) -> float | None:
    value = results.get(case, {}).get(key, {})
    found = value.get(field) if isinstance(value, dict) else None
    return float(found) if found is not None else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Target:
    """One PASS/MISS row: a measured figure of one PortalPool backend against a bound."""

    what: str
    case: str
    contender: str
    measure: Callable[[Results], float | None]
    at_least: bool
    bound: float
    unit: str
    #: a figure that, when present in the contender's figures, means this one failed
    error_field: str | None = None

    def check(self, results: Results) -> dict[str, Any] | None:
        """The row, ``None`` if the case did not run; ``FAILED`` if it raised; ``SKIPPED``
        if the contender could not run here."""
        row: dict[str, Any] = {
            "what": self.what,
            "case": self.case,
            "contender": self.contender,
            "measured": None,
            "required": f"{'≥' if self.at_least else '≤'} {self.bound:g}{self.unit}",
            "unit": self.unit,
        }
        if self.case not in results:
            return None
        figures = results[self.case].get(self.contender, {})
        if "error" in figures or (self.error_field and self.error_field in figures):
            return row | {"result": "FAILED"}
        if "skipped" in figures:
            return row | {"result": "SKIPPED", "reason": figures["skipped"]}
        value = self.measure(results)
        if value is None:
            return None
        passed = value >= self.bound if self.at_least else value <= self.bound
        return row | {"measured": value, "result": "PASS" if passed else "MISS"}


Measure = Callable[[Results], float | None]


def _vs_seed(case: str, key: str, field: str) -> Measure:
    """This contender's ``field`` ÷ the seed's, both from ``case``."""
    return lambda results: _ratio(
        _get(results, case, key, field), _get(results, case, "seed", field)
    )


def _speedup_vs_seed(key: str, field: str) -> Measure:
    """The seed's sleepers wall time (via submit) ÷ this contender's ``field``."""
    return lambda results: _ratio(
        _get(results, "sleepers", "seed", "submit_s"), _get(results, "sleepers", key, field)
    )


def _vs_floor(key: str, field: str) -> Measure:
    """This contender's sleepers ``field`` ÷ the same sleepers on its own bare loops."""
    return lambda results: _ratio(
        _get(results, "sleepers", key, field), _get(results, "sleepers", key, "bare_s")
    )


def _figure(case: str, key: str, field: str) -> Measure:
    return lambda results: _get(results, case, key, field)


def _free_threaded_only(measure: Measure, key: str) -> Measure:
    """``measure`` where the cpu case ran on a free-threaded build; else no row (with the
    GIL, pure-Python work cannot scale with workers, and no target says it should)."""
    return lambda results: (
        measure(results) if results.get("cpu", {}).get(key, {}).get("free_threaded") else None
    )


def targets(counts: Counts) -> list[Target]:
    """The project's performance targets, for each PortalPool backend.

    asyncio's bounds apply to uvloop too: both are compared with the plain-asyncio seed.
    """
    rows: list[Target] = []
    sleepers = f"{counts.sleepers:,} sleepers"
    for key, aio in (("asyncio", True), ("uvloop", True), ("trio", False)):
        rows += [
            Target(
                "submit throughput ÷ seed",
                "submit",
                key,
                _vs_seed("submit", key, "items_per_s"),
                True,
                1.2 if aio else 2.5,
                TIMES,
            ),
            Target(
                "map throughput ÷ seed",
                "map",
                key,
                _vs_seed("map", key, "items_per_s"),
                True,
                3.0 if aio else 2.5,
                TIMES,
            ),
            Target(
                "round trip p50 ÷ seed",
                "latency",
                key,
                _vs_seed("latency", key, "p50_us"),
                False,
                1.2 if aio else 1.3,
                TIMES,
            ),
        ]
        if not aio:
            rows.append(
                Target(
                    "round trip p50, every thread on one CPU, ÷ seed",
                    "latency",
                    key,
                    _vs_seed("latency", key, "p50_us_one_cpu"),
                    False,
                    1.1,
                    TIMES,
                )
            )
        for via in ("submit", "map"):
            field = f"{via}_s"
            rows.append(
                Target(
                    f"{sleepers} via {via} ÷ the same on bare loops",
                    "sleepers",
                    key,
                    _vs_floor(key, field),
                    False,
                    1.35 if via == "submit" else 1.1,
                    TIMES,
                )
            )
            rows.append(
                Target(
                    f"{sleepers} via {via}: wall time",
                    "sleepers",
                    key,
                    _figure("sleepers", key, field),
                    False,
                    0.6 if aio else 0.7,
                    " s",
                )
            )
            if aio:
                rows.append(
                    Target(
                        f"{sleepers} via {via}: speedup vs seed",
                        "sleepers",
                        key,
                        _speedup_vs_seed(key, field),
                        True,
                        2.0,
                        TIMES,
                    )
                )
        rows += [
            Target(
                "pure-Python CPU coroutines, 2 ÷ 1 workers (free-threaded build)",
                "cpu",
                key,
                _free_threaded_only(_figure("cpu", key, "speedup"), key),
                True,
                1.85,
                TIMES,
            ),
            Target(
                "pure-Python CPU 2 ÷ 1 workers ÷ the seed's (free-threaded build)",
                "cpu",
                key,
                _free_threaded_only(_vs_seed("cpu", key, "speedup"), key),
                True,
                1.0,
                TIMES,
            ),
            Target(
                "sha256 scaling, 2 ÷ 1 workers",
                "scaling",
                key,
                _figure("scaling", key, "speedup"),
                True,
                1.7,
                TIMES,
            ),
            Target(
                f"{counts.rss_items:,}-item bounded map: peak RSS growth",
                "rss",
                key,
                _figure("rss", key, "growth_mib"),
                False,
                64.0,
                " MiB",
            ),
            Target(
                "submit throughput with max_concurrency ÷ unlimited",
                "limits",
                key,
                _figure("limits", key, "max_concurrency_ratio"),
                True,
                0.9,
                TIMES,
            ),
            Target(
                "submit throughput with max_pending ÷ unlimited",
                "limits",
                key,
                _figure("limits", key, "max_pending_ratio"),
                True,
                0.9,
                TIMES,
            ),
        ]
    return rows


def _vs(case: str, key: str, field: str, other: str) -> Measure:
    """This contender's ``field`` ÷ another contender's, both from ``case``."""
    return lambda results: _ratio(
        _get(results, case, key, field), _get(results, case, other, field)
    )


def process_targets(counts: Counts) -> list[Target]:
    """The process host's targets, for each of its backends, from the processes case."""
    rows: list[Target] = []
    case = "processes"
    for key in ("process_asyncio", "process_trio"):
        rows += [
            Target(
                "submit throughput ÷ ProcessPoolExecutor (sync no-ops)",
                case,
                key,
                _vs(case, key, "submit_items_per_s", "executor"),
                True,
                4.0,
                TIMES,
                "submit_error",
            ),
            Target(
                "submit throughput ÷ PortalPool threads",
                case,
                key,
                _vs(case, key, "submit_items_per_s", "threads"),
                True,
                0.7,
                TIMES,
                "submit_error",
            ),
            Target(
                "map throughput ÷ PortalPool threads",
                case,
                key,
                _vs(case, key, "map_items_per_s", "threads"),
                True,
                1.5,
                TIMES,
                "map_error",
            ),
            Target(
                "map throughput ÷ aiomultiprocess",
                case,
                key,
                _vs(case, key, "map_items_per_s", "amp"),
                True,
                5.0,
                TIMES,
                "map_error",
            ),
            Target(
                "round trip p50 ÷ ProcessPoolExecutor",
                case,
                key,
                _vs(case, key, "p50_us", "executor"),
                False,
                1.1,
                TIMES,
                "latency_error",
            ),
            Target(
                "pure-Python CPU tasks, 2 ÷ 1 workers",
                case,
                key,
                _figure(case, key, "cpu_speedup"),
                True,
                1.8,
                TIMES,
                "cpu_error",
            ),
            Target(
                "pure-Python CPU speedup ÷ ProcessPoolExecutor's",
                case,
                key,
                _vs(case, key, "cpu_speedup", "executor"),
                True,
                0.9,
                TIMES,
                "cpu_error",
            ),
            Target(
                "start to first results ÷ ProcessPoolExecutor",
                case,
                key,
                _vs(case, key, "start_s", "executor"),
                False,
                1.0,
                TIMES,
                "start_error",
            ),
            Target(
                f"{counts.rss_items:,}-item bounded map: the parent's peak RSS growth",
                case,
                key,
                _figure(case, key, "rss_growth_mib"),
                False,
                32.0,
                " MiB",
                "rss_error",
            ),
        ]
    return rows


def _vs_bare_of_phase(key: str, field: str) -> Measure:
    """A Ray pool's ``field`` ÷ the bare Ray actors' in the same phase (see
    ``bench/ray_case.py``), or over every phase where there is none."""

    def measure(results: Results) -> float | None:
        bare = results.get("ray", {}).get("bare", {})
        reference = bare.get("phases", {}).get(key, {}).get(field, bare.get(field))
        return _ratio(
            _get(results, "ray", key, field), None if reference is None else float(reference)
        )

    return measure


def ray_targets() -> list[Target]:
    """The Ray host's targets (issue 12), for each of its backends, from the ray case. The
    round trip's bound is for an asyncio worker; trio's round trip is shown, not checked."""
    rows: list[Target] = []
    case = "ray"
    for key in ("ray_asyncio", "ray_trio"):
        if key == "ray_asyncio":
            rows.append(
                Target(
                    "round trip p50 ÷ bare Ray async actors",
                    case,
                    key,
                    _vs_bare_of_phase(key, "p50_us"),
                    False,
                    1.3,
                    TIMES,
                )
            )
        rows += [
            Target(
                "submit throughput ÷ bare Ray async actors",
                case,
                key,
                _vs_bare_of_phase(key, "submit_items_per_s"),
                True,
                0.8,
                TIMES,
            ),
            Target(
                "map (chunksize 512) throughput ÷ its own per-item submit",
                case,
                key,
                _figure(case, key, "map_per_submit"),
                True,
                30.0,
                TIMES,
            ),
            Target(
                "pure-Python CPU coroutines, 2 ÷ 1 workers",
                case,
                key,
                _figure(case, key, "cpu_speedup"),
                True,
                1.8,
                TIMES,
            ),
        ]
    return rows


def check_targets(results: Results, counts: Counts) -> list[dict[str, Any]]:
    """Every target whose case ran in this run."""
    every = [*targets(counts), *process_targets(counts), *ray_targets()]
    checked = (target.check(results) for target in every)
    return [row for row in checked if row is not None]


# -- markdown ----------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if unit == "items/s":
        return f"{value:,.0f}"
    if unit in ("µs", "MiB", "ms"):
        return f"{value:,.1f}"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:.2f}{TIMES}"


def _row(
    label: str,
    contenders: Iterable[Contender],
    results: Results,
    case: str,
    field: str,
    unit: str,
    seed_field: str | None = None,
    marks: dict[str, str] | None = None,
    bracket_field: str | None = None,
    note: Callable[[dict[str, Any]], str] | None = None,
) -> str | None:
    """One table row; the ratio in parentheses is this value ÷ the seed's ``seed_field``."""
    if case not in results:
        return None
    seed = _get(results, case, "seed", seed_field) if seed_field else None
    cells = []
    for contender in contenders:
        if "error" in results[case].get(contender.key, {}):
            cells.append("failed")
            continue
        value = _get(results, case, contender.key, field)
        if value is None:
            cells.append("—")
            continue
        cell = _fmt(value, unit) + (marks or {}).get(contender.key, "")
        ratio = _ratio(value, seed)
        if ratio is not None and contender.key != "seed":
            cell += f" ({ratio:.2f}{TIMES})"
        bracket = _get(results, case, contender.key, bracket_field) if bracket_field else None
        if bracket is not None:
            cell += f" [{bracket:.2f}{TIMES}]"
        if note is not None:
            cell += note(results[case][contender.key])
        cells.append(cell)
    return f"| {label} | " + " | ".join(cells) + " |"


def _cpu_note(figures: dict[str, Any]) -> str:
    """The cpu row's brackets: CPU/wall of the best 2-worker round, the load average,
    and the plain threads' 2-vs-1."""
    notes = [f"{figures['cpu_per_wall']:.2f} CPU/wall"]
    if figures.get("loadavg_1m") is not None:
        notes.append(f"load {figures['loadavg_1m']:.2f}")
    notes.append(f"threads {figures['threads_speedup']:.2f}{TIMES}")
    return f" [{', '.join(notes)}]"


def _load_note(machine: dict[str, Any]) -> str:
    start, end = machine.get("loadavg_at_start"), machine.get("loadavg_at_end")
    if not start or not end:
        return ""
    return (
        f" 1-minute load average {start[0]:.2f} at the start, {end[0]:.2f} at the end "
        "(anything near or above 1 means another process shared the cores)."
    )


def _main_notes(counts: Counts) -> list[str]:
    """The main table's footnote, after a blank line."""
    return [
        "",
        f"Throughput and wall times are the best of {counts.repeats} runs on one warmed-up "
        "pool (all runs are in `bench/results/latest.json`). "
        "Ratios in parentheses are contender ÷ seed pattern, from the same run: higher is "
        "better for items/s, lower is better for µs and wall seconds (the map-sleepers row is "
        "divided by the seed's submit time). ¹ The seed pattern and raw anyio portals have no "
        "`map`; their map row is per-item submit again (`run_coroutine_threadsafe` / "
        "`start_task_soon`), measured separately. Round trips: seed "
        "`run_coroutine_threadsafe(...).result()`, anyio `portal.call`, PortalPool "
        "`pool.run`, "
        f"{counts.latency_calls:,} calls after {counts.latency_warmup} warm-up, every "
        f"contender open at once and taking turns of {counts.latency_calls // LATENCY_TURNS} "
        "calls in a rotating order. Sleepers: each "
        "contender awaits its backend's own sleep (`asyncio.sleep(0.1)`, or `trio.sleep(0.1)` "
        "on trio; the raw portals `anyio.sleep(0.1)`); the floor row runs the same sleepers "
        "on 2 threads that each run a bare loop of that kind, with no pool; wall time from the "
        "first submit to the last result. Scaling: time(1 worker) ÷ time(2 workers), best of "
        f"{counts.repeats} alternating rounds; in brackets, the same hashing on 2 vs 1 plain "
        "threads in the same rounds, i.e. what the machine allowed at that moment. RSS: a fresh "
        "subprocess per backend, VmHWM after minus before iterating the map without keeping "
        f"results. ² {counts.skew_tasks:,} sync tasks arriving one per 2 ms, each "
        "blocking its loop for 0.2 ms or (a seeded random 10%) 20 ms. Limits: set high "
        "enough never to bind, so the row is their bookkeeping cost alone. ³ The same round "
        "trips again with the caller and every contender's threads pinned to one CPU. With "
        "threads free to move, most of a round trip on an idle machine is spent between cores, "
        "and how much changes with the order the threads were started; pinned, the figure is "
        "the cost of the round trip's own code. "
        f"⁴ Coroutines that compute about {counts.cpu_task_ms} ms each without awaiting "
        "(a pure-Python loop), on 1 worker and on 2, best of "
        f"{counts.repeats} alternating rounds. CPU/wall: the process's CPU seconds ÷ wall "
        "seconds in the best 2-worker round (2.00: both workers computed throughout); load: "
        "the 1-minute load average after the rounds; plain threads: the same loops on 2 vs "
        "1 threads in the same rounds. With the GIL, no contender can gain here; on a "
        "free-threaded build each loop computes on its own core.",
    ]


def render_sections(
    results: Results,
    contenders: list[Contender],
    counts: Counts,
    machine: dict[str, Any],
    checks: list[dict[str, Any]],
    problems: dict[str, str],
    quick: bool,
) -> list[str]:
    """The markdown block in sections: the machine line with the main table, its targets
    and notes; the Processes table; the What-happens-when table; the problems."""
    no_map = {"seed": "¹", "portal": "¹"}
    n = f"{counts.noops:,}"
    rows = [
        _row(
            f"submit: {n} no-ops, items/s",
            contenders,
            results,
            "submit",
            "items_per_s",
            "items/s",
            "items_per_s",
        ),
        _row(
            f"map: {n} no-ops, chunksize={counts.chunksize}, items/s",
            contenders,
            results,
            "map",
            "items_per_s",
            "items/s",
            "items_per_s",
            no_map,
        ),
        _row(
            "round trip (`run`) p50, µs", contenders, results, "latency", "p50_us", "µs", "p50_us"
        ),
        _row(
            "round trip (`run`) p99, µs", contenders, results, "latency", "p99_us", "µs", "p99_us"
        ),
        _row(
            "round trip p50, every thread on one CPU³, µs",
            contenders,
            results,
            "latency",
            "p50_us_one_cpu",
            "µs",
            "p50_us_one_cpu",
        ),
        _row(
            f"{counts.sleepers:,} {TIMES} sleep(0.1) via submit, wall s",
            contenders,
            results,
            "sleepers",
            "submit_s",
            "s",
            "submit_s",
        ),
        _row(
            f"{counts.sleepers:,} {TIMES} sleep(0.1) via map(chunksize={counts.chunksize}), wall s",
            contenders,
            results,
            "sleepers",
            "map_s",
            "s",
            "submit_s",
        ),
        _row(
            f"the same sleepers on {WORKERS_NOTE}bare loops (no pool): the floor, wall s",
            contenders,
            results,
            "sleepers",
            "bare_s",
            "s",
        ),
        _row(
            f"sha256 of {counts.hashes} {TIMES} 1 MiB: 1 → 2 workers speedup",
            contenders,
            results,
            "scaling",
            "speedup",
            TIMES,
            bracket_field="threads_speedup",
        ),
        _row(
            f"{counts.cpu_tasks} pure-Python CPU coroutines⁴: 1 → 2 workers speedup "
            "[CPU/wall, load, plain threads]",
            contenders,
            results,
            "cpu",
            "speedup",
            TIMES,
            note=_cpu_note,
        ),
        _row(
            f"{counts.rss_items:,}-item `map(buffersize={counts.rss_buffersize})`: "
            "peak RSS growth, MiB",
            contenders,
            results,
            "rss",
            "growth_mib",
            "MiB",
        ),
        _row(
            "skewed load², `round_robin`: p99 submit → result, ms",
            contenders,
            results,
            "skew",
            "round_robin_p99_ms",
            "ms",
        ),
        _row(
            "skewed load², `least_loaded`: p99 submit → result, ms",
            contenders,
            results,
            "skew",
            "least_loaded_p99_ms",
            "ms",
        ),
        _row(
            "skewed load², `round_robin`: last result, s",
            contenders,
            results,
            "skew",
            "round_robin_tail_s",
            "s",
        ),
        _row(
            "skewed load², `least_loaded`: last result, s",
            contenders,
            results,
            "skew",
            "least_loaded_tail_s",
            "s",
        ),
        _row(
            f"submit throughput with `max_concurrency=1000`, {TIMES} unlimited",
            contenders,
            results,
            "limits",
            "max_concurrency_ratio",
            TIMES,
        ),
        _row(
            f"submit throughput with `max_pending={2 * counts.noops:,}`, {TIMES} unlimited",
            contenders,
            results,
            "limits",
            "max_pending_ratio",
            TIMES,
        ),
        _row(
            f"submit throughput with the stall watchdog (`stall_timeout=0.2`), {TIMES} without",
            contenders,
            results,
            "limits",
            "watchdog_ratio",
            TIMES,
        ),
    ]
    packages = machine["packages"]
    own = {"processes", "ray", "failures"}
    header = (
        f"Measured {machine['date']} on {machine['cpu_model']}, nproc {machine['nproc']}, "
        f"{machine['platform']}, {machine['python']} "
        f"({machine['gil']}), anyio {packages['anyio']}, trio {packages['trio']}, "
        f"uvloop {packages['uvloop']}"
        + (
            f", aiomultiprocess {packages.get('aiomultiprocess', 'not installed')}"
            if own & set(results)
            else ""
        )
        + (f", ray {packages.get('ray', 'not installed')}" if "ray" in results else "")
        + f", portal_pool {packages['portal_pool']} {packages['portal_pool_source']}"
        ". One process, one run of `python -m bench"
        f"{' --quick' if quick else ''}`; every contender has 2 workers"
        f"{' (QUICK RUN: counts ÷ 10, not comparable to a full run)' if quick else ''}."
        f"{_load_note(machine)}"
    )
    lines = [header]
    main_rows = [row for row in rows if row is not None]
    if main_rows:
        lines += [
            "",
            "| figure | " + " | ".join(c.label for c in contenders) + " |",
            "| --- |" + " ---: |" * len(contenders),
            *main_rows,
        ]
        lines += _targets_table([check for check in checks if check.get("case") not in own])
        lines += _main_notes(counts)
    sections = ["\n".join(lines)]
    if results.get("processes"):
        process_checks = [check for check in checks if check.get("case") == "processes"]
        sections.append(render_processes(results["processes"], counts, process_checks))
    if results.get("ray"):
        ray_checks = [check for check in checks if check.get("case") == "ray"]
        sections.append(render_ray(results["ray"], counts, ray_checks))
    if results.get("failures"):
        from .failures import HARD_TIMEOUT

        labels = {entrant.key: entrant.label for entrant in PROCESS_CONTENDERS}
        sections.append(render_failures(results["failures"], labels, HARD_TIMEOUT))
    if problems:
        sections.append(
            "**Problems in this run:**\n\n"
            + "\n".join(f"- `{where}` {what}" for where, what in problems.items())
        )
    return sections


def render(
    results: Results,
    contenders: list[Contender],
    counts: Counts,
    machine: dict[str, Any],
    checks: list[dict[str, Any]],
    problems: dict[str, str],
    quick: bool,
) -> str:
    """The whole markdown block, as printed."""
    return "\n\n".join(
        render_sections(results, contenders, counts, machine, checks, problems, quick)
    )


def _targets_table(checks: list[dict[str, Any]]) -> list[str]:
    """The PASS/MISS table of these checks (nothing if there are none), after a blank line."""
    if not checks:
        return []
    # A target skipped for several contenders is one row naming them all.
    merged: list[dict[str, Any]] = []
    skipped: dict[tuple[str, str], dict[str, Any]] = {}
    for check in checks:
        if check["result"] != "SKIPPED":
            merged.append(check)
            continue
        same = skipped.get((check["what"], check["required"]))
        if same is None:
            skipped[check["what"], check["required"]] = check = dict(check)
            merged.append(check)
        else:
            same["contender"] += f", {check['contender']}"
    lines = [
        "",
        "| target | PortalPool | measured | required | result |",
        "| --- | --- | ---: | ---: | :---: |",
    ]
    for check in merged:
        measured, unit = check["measured"], check["unit"]
        if measured is None:
            shown = "—"
        elif unit == " MiB":
            shown = f"{measured:.1f} MiB"
        else:
            shown = f"{measured:.2f}{unit}"
        if check["result"] == "PASS":
            result = "PASS"
        elif check["result"] == "SKIPPED":
            result = "skipped"
        else:
            result = f"**{check['result']}**"
        lines.append(
            f"| {check['what']} | {check['contender']} | {shown} | {check['required']} | {result} |"
        )
    return lines


def _skipped_note(figures: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    skipped = [
        f"{labels.get(key, key)} ({values['skipped']})"
        for key, values in figures.items()
        if "skipped" in values
    ]
    return ["", "Not measured here: " + "; ".join(skipped) + "."] if skipped else []


def _process_cell(
    figures: dict[str, dict[str, Any]], key: str, field: str, unit: str, step: str
) -> str:
    mine = figures.get(key, {})
    if f"{step}_error" in mine:
        return "failed"
    value = mine.get(field)
    if value is None:
        return "—"
    cell = _fmt(float(value), unit)
    reference = figures.get("executor", {}).get(field)
    if key != "executor" and reference:
        cell += f" ({float(value) / float(reference):.2f}{TIMES})"
    if field == "cpu_speedup" and mine.get("cpu_per_wall") is not None:
        notes = [f"{mine['cpu_per_wall']:.2f} CPU/wall"]
        if mine.get("others_cpu_per_wall") is not None:
            notes.append(f"others {mine['others_cpu_per_wall']:.2f}")
        if mine.get("cpu_loadavg_1m") is not None:
            notes.append(f"load {mine['cpu_loadavg_1m']:.2f}")
        cell += f" [{', '.join(notes)}]"
    if field == "rss_children_peak_mib" and mine.get("rss_children_max_growth_mib") is not None:
        cell += f" [+{mine['rss_children_max_growth_mib']:,.1f}]"
    return cell


def render_processes(
    figures: dict[str, dict[str, Any]], counts: Counts, checks: list[dict[str, Any]]
) -> str:
    """The Processes table, its targets and its notes."""
    labels = {entrant.key: entrant.label for entrant in PROCESS_CONTENDERS}
    columns = [
        entrant
        for entrant in PROCESS_CONTENDERS
        if entrant.key in figures and "skipped" not in figures[entrant.key]
    ]
    lines = ["### Processes", ""]
    if not columns:
        return "\n".join([*lines, "Nothing measured.", *_skipped_note(figures, labels)])
    setup = figures.get("_setup", {})
    n = f"{counts.noops:,}"
    tasks = f"{counts.cpu_tasks} pure-Python CPU tasks⁶"
    rows = [
        (f"submit: {n} no-ops⁴, items/s", "submit_items_per_s", "items/s", "submit"),
        (
            f"map: {n} no-ops⁴, chunksize={counts.chunksize}⁵, items/s",
            "map_items_per_s",
            "items/s",
            "map",
        ),
        ("round trip p50⁵, µs", "p50_us", "µs", "latency"),
        ("round trip p99⁵, µs", "p99_us", "µs", "latency"),
        (f"{tasks} on 1 worker, wall s", "cpu_one_s", "s", "cpu"),
        (f"{tasks} on 2 workers, wall s", "cpu_two_s", "s", "cpu"),
        (
            f"{tasks}: 1 → 2 workers speedup [CPU/wall, others, load]",
            "cpu_speedup",
            TIMES,
            "cpu",
        ),
        ("2 workers from nothing to their first results⁷, s", "start_s", "s", "start"),
        (
            f"{counts.rss_items:,}-item `map(buffersize={counts.rss_buffersize})`⁸: "
            "the parent's peak RSS growth, MiB",
            "rss_growth_mib",
            "MiB",
            "rss",
        ),
        (
            "the same map⁸: the children's peak RSS [largest growth], MiB",
            "rss_children_peak_mib",
            "MiB",
            "rss",
        ),
    ]
    lines += [
        "| figure | " + " | ".join(entrant.label for entrant in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for label, field, unit, step in rows:
        cells = [_process_cell(figures, entrant.key, field, unit, step) for entrant in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _targets_table(checks)
    iterations = setup.get("cpu_task_iterations")
    lines += [
        "",
        "Ratios in parentheses are contender ÷ `ProcessPoolExecutor`, from the same run. "
        f"`ProcessPoolExecutor` uses the {setup.get('start_method', 'forkserver')} start "
        "method. ⁴ It cannot run coroutines, so its no-ops and CPU tasks are plain "
        "functions; every other contender runs coroutines. aiomultiprocess has no per-item "
        "submit that returns a future, hence no submit row. ⁵ aiomultiprocess (its default "
        "spawn start method, plus a manager process) has no `chunksize`: its map sends one "
        "queue item per element. Its parent and children poll every 5 ms, so its round trip "
        f"takes milliseconds; it is timed alone, {counts.amp_latency_calls} calls after "
        f"10 warm-up, while the others take turns as in the main table ({counts.latency_calls:,} "
        f"calls after {counts.latency_warmup} warm-up, `run` or `submit(...).result()`). "
        f"⁶ Each task is a pure-Python loop of {iterations or '?':,} iterations, about "
        f"{counts.cpu_task_ms} ms on one core here; the 1-worker and 2-worker pools run "
        f"them in {counts.repeats} alternating rounds and the speedup is best ÷ best. "
        "`childconcurrency=1` makes each aiomultiprocess child take one task at a time "
        "(by default it takes up to 16, so one child can take all 8). CPU/wall: user + system "
        "CPU seconds of the bench process and all its descendants (read from /proc, since "
        "`RUSAGE_CHILDREN` only counts children that have exited) during the best 2-worker "
        "round, ÷ its wall time: 2.00 means both workers computed throughout. Others: the "
        "CPU the rest of the machine used in that round (from /proc/stat, hypervisor steal "
        "included) ÷ its wall time; above 0.1 or so, another process was competing. Load: the "
        "1-minute load average after that contender's rounds, its own work included. "
        "⁷ A fresh interpreter per "
        "sample, timed from the constructor to the results of one no-op per worker, so a "
        "forkserver or manager started on first use is inside it; best of "
        f"{counts.repeats}. ⁸ The process host only: a fresh interpreter per backend "
        "(`bench/rss_probe.py`) iterates `pool.map(noop, range(N), buffersize=...)` without "
        "keeping the results; the figure is the parent's VmHWM after minus before. The "
        "children's row is the larger of the two children's VmHWM after the map (read from "
        "/proc of `pool.workers[i].pid`), and in brackets the larger growth over the map. "
        f"Throughput: best of {counts.repeats} on one warmed-up pool.",
        *_skipped_note(figures, labels),
    ]
    return "\n".join(lines)


def _ray_cell(figures: dict[str, dict[str, Any]], key: str, field: str, unit: str) -> str:
    mine = figures.get(key, {})
    value = mine.get(field)
    if value is None:
        return "failed" if "error" in mine else "—"
    cell = _fmt(float(value), unit)
    bare = figures.get("bare", {})
    reference = bare.get("phases", {}).get(key, {}).get(field, bare.get(field))
    if key != "bare" and reference and unit != TIMES:
        cell += f" ({float(value) / float(reference):.2f}{TIMES})"
    if field == "cpu_speedup" and mine.get("cpu_per_wall") is not None:
        notes = [f"{mine['cpu_per_wall']:.2f} CPU/wall"]
        if mine.get("others_cpu_per_wall") is not None:
            notes.append(f"others {mine['others_cpu_per_wall']:.2f}")
        cell += f" [{', '.join(notes)}]"
    return cell


def render_ray(
    figures: dict[str, dict[str, Any]], counts: Counts, checks: list[dict[str, Any]]
) -> str:
    """The Ray table, its targets and its notes."""
    labels = {entrant.key: entrant.label for entrant in RAY_CONTENDERS}
    columns = [
        entrant
        for entrant in RAY_CONTENDERS
        if entrant.key in figures and "skipped" not in figures[entrant.key]
    ]
    lines = ["### Ray", ""]
    if not columns:
        return "\n".join([*lines, "Nothing measured.", *_skipped_note(figures, labels)])
    setup = figures.get("_setup", {})
    n = f"{setup.get('noops', counts.ray_noops):,}"
    items = f"{setup.get('map_items', counts.noops):,}"
    tasks = f"{counts.cpu_tasks} pure-Python CPU coroutines¹²"
    rows = [
        (f"submit: {n} no-ops, items/s", "submit_items_per_s", "items/s"),
        (
            f"map: {items} no-ops, chunksize={counts.chunksize}⁹, items/s",
            "map_items_per_s",
            "items/s",
        ),
        ("map ÷ per-item submit", "map_per_submit", TIMES),
        ("round trip p50¹⁰, µs", "p50_us", "µs"),
        ("round trip p99¹⁰, µs", "p99_us", "µs"),
        (f"{tasks} on 1 worker, wall s", "cpu_one_s", "s"),
        (f"{tasks} on 2 workers, wall s", "cpu_two_s", "s"),
        (f"{tasks}: 1 → 2 workers speedup [CPU/wall, others]", "cpu_speedup", TIMES),
        ("2 workers from the constructor to their first results¹¹, s", "start_s", "s"),
    ]
    lines += [
        "| figure | " + " | ".join(entrant.label for entrant in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for label, field, unit in rows:
        cells = [_ray_cell(figures, entrant.key, field, unit) for entrant in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _targets_table(checks)
    start, end = setup.get("loadavg_1m_start"), setup.get("loadavg_1m_end")
    load = (
        f" 1-minute load average {start:.2f} when the case started, {end:.2f} when it ended."
        if start is not None and end is not None
        else ""
    )
    init = setup.get("ray_init_s")
    measured = f"Measured {setup['date']}; " if setup.get("date") else ""
    lines += [
        "",
        f"{measured}Ray {setup.get('ray_version', '?')}, a local runtime started by the case "
        f'(`ray.init(address="local", num_cpus={setup.get("ray_cpus", 2)}, '
        "include_dashboard=False)`"
        + (f", {init:.1f} s" if init is not None else "")
        + f").{load} Ratios in parentheses are contender ÷ bare Ray async actors, from the "
        "same run (for a Ray pool, from the same phase). The bare actors are 2 actors of a "
        "class whose `async def call(self, fn, "
        "*args)` awaits `fn(*args)`, with Ray's default options; the PortalPool contenders "
        "are `PortalPool(2, backend=..., host=RayHost(num_cpus=1))`. Each Ray pool's actors "
        "take the runtime's 2 CPUs, so the Ray pools are measured one after the other, each "
        "in a phase of its own; the bare actors (which hold no CPU once placed, as Ray's "
        "actors do by default) and the thread pool stay open and take part in both phases, "
        "and their columns put the samples of both together; a Ray pool's ratio is against "
        "the bare actors' figure from its own phase. Within a phase, the contenders run "
        "alternating rounds. Submit: the no-ops are submitted round robin over the 2 "
        "workers, then every result is awaited (bare: `.remote()` round robin, then one "
        f"`ray.get` of all); best of {counts.repeats} rounds per phase. ⁹ The bare actors "
        "have no map: "
        "their row is a hand-made chunk, one `call_chunk(fn, items)` per 512 items that "
        "gathers them in the actor's loop, all chunks sent round robin, then one `ray.get`. "
        f"¹⁰ `pool.run(noop)` or `ray.get(actor.call.remote(noop))` one at a time, "
        f"{counts.ray_latency_calls:,} calls per phase after {counts.ray_latency_warmup} "
        "warm-up, every contender of the phase taking turns in a rotating order. ¹¹ From "
        "`PortalPool(...)` (bare: the actors' `.remote()`) to one no-op's result from each "
        "worker, with the Ray runtime already running; best of "
        f"{counts.repeats} alternating samples, each pool alone on the runtime's CPUs. "
        f"¹² Each coroutine is a pure-Python loop of "
        f"{setup.get('cpu_task_iterations') or 0:,} iterations, about "
        f"{counts.cpu_task_ms} ms on one core here, that never awaits. 1 worker: all "
        f"{counts.cpu_tasks} sent to the first worker (`pool.workers[0].submit`; bare: the "
        "first actor) of the same 2-worker pool; 2 workers: round robin over both; "
        "alternating rounds, best ÷ best. CPU/wall: user + system CPU seconds of the bench "
        "process and all its descendants, the Ray runtime's processes included, in the "
        "best 2-worker round ÷ its wall time. Others: the CPU the rest of the machine used "
        "in that round ÷ its wall time.",
        *_skipped_note(figures, labels),
    ]
    return "\n".join(lines)


def render_failures(
    figures: dict[str, dict[str, Any]], labels: dict[str, str], timeout: float
) -> str:
    """The What-happens-when table: one row per situation, one column per contender."""
    from .failures import (
        INTERRUPT_EXIT,
        INTERRUPT_GRACE,
        KILL_SETTLE,
        NEW_WORK_TIMEOUT,
        SITUATIONS,
        UNPICKLABLE_WAIT,
    )

    keys = [key for key, values in figures.items() if "skipped" not in values]
    lines = ["### What happens when", ""]
    if not keys:
        return "\n".join([*lines, "Nothing measured.", *_skipped_note(figures, labels)])
    lines += [
        "| situation | " + " | ".join(labels.get(key, key) for key in keys) + " |",
        "| --- |" + " --- |" * len(keys),
    ]
    for situation, described in SITUATIONS.items():
        cells = [
            str(figures[key].get(situation, {}).get("text", "—")).replace("|", "\\|")
            for key in keys
        ]
        lines.append(f"| {described} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "2 workers each; `python -m bench.failures` runs this table alone. Every cell is one "
        "run of a fresh subprocess in a session of its own, killed with its whole process "
        f"group when it is done or after {timeout:g} s (**hung**). The tasks sleep "
        "(`time.sleep` on `ProcessPoolExecutor`, `anyio.sleep` elsewhere) and leave a "
        "marker file when they start and another in their `finally`. SIGKILL: once the tasks "
        "run (`ProcessPoolExecutor` runs one per worker, the rest wait), the child running "
        f"the most of them is killed; the futures get {KILL_SETTLE:g} s to settle, then a "
        f"new no-op gets {NEW_WORK_TIMEOUT:g} s (on PortalPool it is submitted to the killed "
        "child's worker, so it runs on the replacement child). *Exactly its tasks*: the "
        "futures that failed are those of the tasks that had started in the killed child. "
        "Ctrl-C: SIGINT to the process group, as a "
        "terminal sends it, with the pool in a `with` block (aiomultiprocess: `async with` "
        f"under `asyncio.run`); the parent gets {INTERRUPT_EXIT:g} s to exit, the children "
        f"{INTERRUPT_GRACE:g} s more; a `finally` is *interrupted* if it ran before the "
        f"sleep's end. Unpicklable: `submit(noop, threading.Lock())`, {UNPICKLABLE_WAIT:g} s "
        "for an outcome; *names the argument* if the error says which one (`args[0]`). "
        "aiomultiprocess is driven from a thread that runs its loop: "
        "`submit` is `run_coroutine_threadsafe(pool.apply(...))`, and `cancel()` cancels "
        "that future.",
        *_skipped_note(figures, labels),
    ]
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the run's results, machine and checks as JSON."""
    _write_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def update_readme(path: Path, sections: list[str], chart: str | None) -> None:
    """Replace the text between the bench markers, or append a Performance section.

    ``sections`` are :func:`render_sections`; the chart goes after the first, the main
    table's. Nothing outside the markers is changed.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if chart:
        sections = [
            sections[0],
            f"![throughput by contender and backend]({chart})",
            *sections[1:],
        ]
    body = "\n\n".join(sections)
    section = f"{README_START}\n{body}\n{README_END}"
    start, end = text.find(README_START), text.find(README_END)
    if start != -1 and end > start:
        updated = text[:start] + section + text[end + len(README_END) :]
    elif start == -1 and end == -1:
        # Append after exactly one blank line, whatever the file ends with.
        separator = "\n\n" if text and not text.endswith("\n") else "\n" if text else ""
        if text.endswith("\n\n"):
            separator = ""
        updated = f"{text}{separator}## Performance\n\n{section}\n"
    else:
        raise ValueError(f"{path}: bench markers are unbalanced; not touching it")
    _write_atomic(path, updated)


def write_chart(path: Path, results: Results, contenders: list[Contender], counts: Counts) -> bool:
    """Grouped bars: no-op throughput (submit, map) and sleepers throughput, per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = [
        (
            "no-op tasks, items/s",
            [("submit", "items_per_s", "submit"), ("map", "items_per_s", "map")],
        ),
        (
            "sleep(0.1) tasks, items/s of wall time",
            [("sleepers", "submit_s", "submit"), ("sleepers", "map_s", "map")],
        ),
    ]
    if not any(case in results for _, series in panels for case, _, _ in series):
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 4.5))
    width = 0.38
    for axis, (title, series) in zip(axes, panels, strict=True):
        for offset, (case, field, name) in enumerate(series):
            heights = []
            for contender in contenders:
                value = _get(results, case, contender.key, field)
                if value and case == "sleepers":
                    value = counts.sleepers / value
                heights.append(value or 0.0)
            positions = [i + (offset - 0.5) * width for i in range(len(contenders))]
            bars = axis.bar(positions, heights, width, label=name)
            axis.bar_label(
                bars, labels=[f"{h / 1000:.0f}k" if h else "" for h in heights], fontsize=7
            )
        axis.set_xticks(
            range(len(contenders)), [c.label.replace(" ", "\n", 1) for c in contenders], fontsize=8
        )
        axis.set_title(title)
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1000:.0f}k"))
        axis.legend(fontsize=8)
    figure.suptitle(
        "portal_pool benchmark, 2 workers (map = per-item submit for seed and portals)", fontsize=10
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
