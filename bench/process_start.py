"""Subprocess half of the processes case's start figure:
``python -m bench.process_start KEY`` prints ``{"seconds": ...}``, the time from one
contender's constructor (2 workers) to the results of one no-op per worker.

A fresh interpreter each time, so that whatever a contender starts once per process (a
forkserver, aiomultiprocess's manager) is inside the timing. This module is the children's
``__main__`` too, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import json
import sys
from time import perf_counter


def main(argv: list[str]) -> int:
    """Time the start of the contender named by ``argv[0]``; print the JSON."""
    from bench.processes import contender

    entrant = contender(argv[0])
    start = perf_counter()
    pool = entrant.open(2)
    try:
        futures = [pool.submit(entrant.noop) for _ in range(2)]
        for future in futures:
            future.result()
        seconds = perf_counter() - start
    finally:
        pool.shutdown()
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
