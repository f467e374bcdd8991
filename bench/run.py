"""``python -m bench``: every case, every contender, one process, one table."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from .cases import (
    CASES,
    GROUP_CASES,
    OWN_CASES,
    REPO_ROOT,
    WORKERS,
    Case,
    Counts,
    Figures,
    GroupCase,
    OwnCase,
)
from .contenders import CONTENDERS, Contender
from .processes import PROCESS_CONTENDERS
from .ray_case import RAY_CONTENDERS
from .report import (
    Results,
    check_targets,
    machine_info,
    render_sections,
    update_readme,
    write_chart,
    write_json,
)

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIVISOR = 10


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark PortalPool against the seed pattern and raw anyio portals.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"divide every count by {QUICK_DIVISOR} (a smoke test, not a measurement)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these cases (repeat or comma-separate): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--skip",
        action="append",
        metavar="NAME",
        help="leave these cases out (repeat or comma-separate), e.g. --skip failures",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not touch README.md or the PNG chart"
    )
    args = parser.parse_args(argv)
    for option in ("only", "skip"):
        values = getattr(args, option)
        if values:
            names = [name.strip() for value in values for name in value.split(",")]
            names = [name for name in names if name]
            unknown = [name for name in names if name not in CASES]
            if unknown:
                parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
            setattr(args, option, names)
    return args


def _leftover_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` that are still alive after a short grace period."""
    leftover = [thread for thread in threading.enumerate() if thread not in before]
    for thread in leftover:
        thread.join(timeout=5)
    return [thread.name for thread in leftover if thread.is_alive()]


def _progress(case: str, contender: Contender, figures: dict[str, Any] | None) -> None:
    if figures is None:
        return
    shown = ", ".join(
        f"{key}={value:,.3f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in figures.items()
    )
    print(f"  {case:<8} {contender.label:<20} {shown}", file=sys.stderr, flush=True)


def run_cases(
    names: list[str], contenders: list[Contender], counts: Counts
) -> tuple[Results, dict[str, str]]:
    """Run the chosen cases over every contender; return results and any problems.

    A case that raises is recorded as failed and the run goes on; so is a case that leaves a
    thread running after it has shut its contender down.
    """
    results: Results = {}
    problems: dict[str, str] = {}
    for name in names:
        _, case = CASES[name]
        if name in OWN_CASES:
            # These cases print their own progress, and report a failed contender's
            # figures as ``error`` or ``<figure>_error``.
            own_case = cast(OwnCase, case)
            by_own_key = _guarded(name, partial(own_case, counts), lambda _: {}, problems)
            results[name] = by_own_key
            for key, figures in by_own_key.items():
                errors = _errors(figures)
                if errors:
                    problems[f"{name}/{key}"] = "failed: " + "; ".join(errors)
            continue
        if name in GROUP_CASES:
            group_case = cast(GroupCase, case)
            by_key = _guarded(
                name,
                partial(group_case, contenders, counts),
                lambda error: {contender.key: {"error": error} for contender in contenders},
                problems,
            )
            for contender in contenders:
                _record(name, contender, by_key.get(contender.key), results)
            continue
        single_case = cast(Case, case)
        for contender in contenders:
            figures = _guarded(
                f"{name}/{contender.key}",
                partial(single_case, contender, counts),
                lambda error: {"error": error},
                problems,
            )
            _record(name, contender, figures, results)
    return results, problems


def _errors(figures: Figures) -> list[str]:
    """The errors in an own case's figures for one contender, found at any depth."""
    found: list[str] = []
    for field, value in figures.items():
        if isinstance(value, dict):
            found += [f"{field}: {error}" for error in _errors(value)]
        elif value is not None and (field == "error" or field.endswith("_error")):
            found.append(f"{field} {value}" if field != "error" else str(value))
    return found


def _guarded(
    where: str,
    measure: Callable[[], T],
    on_error: Callable[[str], T],
    problems: dict[str, str],
) -> T:
    """Run ``measure``; an exception, or a thread left running, is a problem at ``where``."""
    before = set(threading.enumerate())
    try:
        outcome = measure()
    except Exception as exc:  # reported in the table; the run goes on
        error = f"{type(exc).__name__}: {exc}"
        outcome = on_error(error)
        problems[where] = f"failed with {error}"
    leftover = _leftover_threads(before)
    if leftover:
        problems[where] = (
            problems.get(where, "") + f" left threads running: {', '.join(leftover)}"
        ).strip()
    return outcome


def _record(name: str, contender: Contender, figures: Figures | None, results: Results) -> None:
    _progress(name, contender, figures)
    if figures is not None:
        results.setdefault(name, {})[contender.key] = figures


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown table; 1 if a case failed or leaked threads."""
    args = _parse(argv)
    counts = Counts().scaled(QUICK_DIVISOR) if args.quick else Counts()
    names = [name for name in args.only or list(CASES) if name not in (args.skip or [])]
    contenders = [contender for contender in CONTENDERS if contender.available]
    skipped = [contender.label for contender in CONTENDERS if not contender.available]
    if skipped:
        print(f"skipping (not installed): {', '.join(skipped)}", file=sys.stderr)

    machine = machine_info()
    results, problems = run_cases(names, contenders, counts)
    if hasattr(os, "getloadavg"):
        machine["loadavg_at_end"] = os.getloadavg()
    checks = check_targets(results, counts)
    sections = render_sections(results, contenders, counts, machine, checks, problems, args.quick)
    print("\n\n".join(sections))

    write_json(
        RESULTS_DIR / "latest.json",
        {
            "machine": machine,
            "quick": args.quick,
            "cases": names,
            "workers": WORKERS,
            "counts": vars(counts),
            "contenders": {c.key: c.label for c in contenders},
            "process_contenders": {c.key: c.label for c in PROCESS_CONTENDERS},
            "ray_contenders": {c.key: c.label for c in RAY_CONTENDERS},
            "results": results,
            "targets": checks,
            "problems": problems,
        },
    )
    if not args.no_write:
        chart = RESULTS_DIR / "throughput.png"
        drawn = write_chart(chart, results, contenders, counts)
        relative = chart.relative_to(REPO_ROOT).as_posix() if drawn else None
        update_readme(REPO_ROOT / "README.md", sections, relative)
    return 1 if problems else 0
