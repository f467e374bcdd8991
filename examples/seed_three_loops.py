"""Three event loops in three threads, three sleeping tasks in each: about one second in all.

The hand-rolled version of this starts a thread per loop, hands coroutines across with
``asyncio.run_coroutine_threadsafe`` and stops and joins everything by hand. With a pool
it is ``PortalPool(3, backend=...)``, one ``submit`` per task and a ``with`` block; the
scenario itself lives in ``portal_pool/_seed.py`` so that ``python -m portal_pool`` runs
exactly the same code::

    python examples/seed_three_loops.py
    python examples/seed_three_loops.py --backend trio
    python examples/seed_three_loops.py --uvloop --workers 4 --delay 0.5

Each task sleeps with ``anyio.sleep``, so it runs unchanged on either backend, and returns
``f"return value from {thread name}"``. Nine tasks of one second each finish in about one
second: the three tasks of a loop sleep concurrently and the three loops run in parallel.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from portal_pool._seed import add_seed_arguments, options_from_args, run_seed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario with the options on the command line and print its results.

    :param argv: the arguments, without the program name; ``None`` means ``sys.argv[1:]``
    :return: the process exit status
    """
    parser = argparse.ArgumentParser(
        description="Run sleeping tasks in several event loops, one loop per thread, "
        "and print what each task returned and how long the whole took."
    )
    add_seed_arguments(parser)
    options = options_from_args(parser, parser.parse_args(argv))
    print(run_seed(options).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
