"""Subprocess half of the RSS figures:
``python -m bench.rss_probe BACKEND OPTIONS N BUFFERSIZE [HOST]``.

Prints one JSON object: peak-RSS (VmHWM) growth of this process over a list-free iteration
of ``pool.map(noop, range(N), buffersize=BUFFERSIZE)`` on a 2-worker pool. ``HOST`` is
``thread`` (the default) or ``process``; on the process host the figures also hold each
child's peak RSS and its growth, read from /proc of ``pool.workers[i].pid`` (Linux only:
``None`` elsewhere).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

from portal_pool import PortalPool

from .workloads import noop

HOSTS = ("thread", "process")


def _vmhwm_kib(status: Path) -> int | None:
    """VmHWM from a /proc/PID/status file, in KiB; ``None`` if it cannot be read."""
    try:
        with status.open(encoding="ascii") as lines:
            for line in lines:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kib() -> int:
    """This process's peak resident set size so far, in KiB."""
    found = _vmhwm_kib(Path("/proc/self/status"))
    if found is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return found


def child_peak_rss_kib(pid: int) -> int | None:
    """Another process's peak resident set size so far, in KiB (``None`` without /proc)."""
    return _vmhwm_kib(Path("/proc", str(pid), "status"))


def _children(pool: PortalPool[Any]) -> list[int]:
    """The workers' process ids, leaving out this process (the thread host's)."""
    return [worker.pid for worker in pool.workers if worker.pid != os.getpid()]


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def main(argv: list[str]) -> int:
    """Run the probe and print its figures as JSON."""
    backend, options, items, buffersize = argv[0], json.loads(argv[1]), int(argv[2]), int(argv[3])
    host = argv[4] if len(argv) > 4 else "thread"
    if host not in HOSTS:
        raise SystemExit(f"host must be one of {HOSTS}, not {host!r}")
    pool: PortalPool[None] = PortalPool(2, backend=backend, backend_options=options, host=host)
    try:
        pool.run(noop)
        gc.collect()
        children = _children(pool)
        children_before = [child_peak_rss_kib(pid) for pid in children]
        before = peak_rss_kib()
        start = perf_counter()
        for _ in pool.map(noop, range(items), buffersize=buffersize):
            pass
        seconds = perf_counter() - start
        after = peak_rss_kib()
        children_after = [child_peak_rss_kib(pid) for pid in children]
        # A child replaced meanwhile would make its figures meaningless.
        children_same = _children(pool) == children
    finally:
        pool.shutdown()
    figures: dict[str, Any] = {
        "host": host,
        "before_mib": before / 1024,
        "after_mib": after / 1024,
        "growth_mib": (after - before) / 1024,
        "items": items,
        "buffersize": buffersize,
        "items_per_s": items / seconds,
    }
    if children:
        growths = [
            None if first is None or last is None or not children_same else (last - first) / 1024
            for first, last in zip(children_before, children_after, strict=True)
        ]
        figures |= {
            "children_before_mib": [_mib(kib) for kib in children_before],
            "children_after_mib": [_mib(kib) for kib in children_after],
            "children_growth_mib": growths,
            "children_peak_mib": max(
                (kib / 1024 for kib in children_after if kib is not None), default=None
            ),
            "children_max_growth_mib": max(
                (growth for growth in growths if growth is not None), default=None
            ),
        }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
