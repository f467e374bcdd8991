"""Subprocess half of the RSS case: ``python -m bench.rss_probe BACKEND OPTIONS N BUFFERSIZE``.

Prints one JSON object: peak-RSS (VmHWM) growth over a list-free iteration of
``pool.map(noop, range(N), buffersize=BUFFERSIZE)``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from time import perf_counter

from portal_pool import PortalPool

from .workloads import noop


def peak_rss_kib() -> int:
    """The process's peak resident set size so far, in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main(argv: list[str]) -> int:
    """Run the probe and print its figures as JSON."""
    backend, options, items, buffersize = argv[0], json.loads(argv[1]), int(argv[2]), int(argv[3])
    pool: PortalPool[None] = PortalPool(2, backend=backend, backend_options=options)
    try:
        pool.run(noop)
        gc.collect()
        before = peak_rss_kib()
        start = perf_counter()
        for _ in pool.map(noop, range(items), buffersize=buffersize):
            pass
        seconds = perf_counter() - start
        after = peak_rss_kib()
    finally:
        pool.shutdown()
    figures = {
        "before_mib": before / 1024,
        "after_mib": after / 1024,
        "growth_mib": (after - before) / 1024,
        "items": items,
        "buffersize": buffersize,
        "items_per_s": items / seconds,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
