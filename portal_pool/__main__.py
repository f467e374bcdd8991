"""``python -m portal_pool``: run the seed scenario, or the benchmark of a source checkout."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

from ._seed import add_seed_arguments, options_from_args, run_seed

DESCRIPTION = """\
Run the scenario portal_pool was built for: a few event loops, each in its own thread,
each running a few tasks that sleep at the same time. Every task returns the name of the
thread that ran it, and the whole run takes about one --delay, not workers x tasks x delay.
"""

EPILOG = """\
examples:
  python -m portal_pool                       3 asyncio loops x 3 tasks, about 1 s
  python -m portal_pool --backend trio --workers 4 --delay 0.5
  python -m portal_pool --uvloop
  python -m portal_pool bench --help          the benchmark (source checkout only)
"""

BENCH_INSTALL = "pip install -e '.[trio,uvloop]' matplotlib"
BENCH_MISSING = (
    "The benchmark is not part of the installed package. Run it from a source checkout "
    f"of portal_pool, after: {BENCH_INSTALL}"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run what it asks for.

    :param argv: the arguments, without the program name; ``None`` means ``sys.argv[1:]``
    :return: the process exit status
    """
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        if _seed_options_given(parser, args):
            parser.error("options before 'bench' are the seed scenario's; put them after it")
        return _run_bench(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    print(run_seed(options_from_args(parser, args)).format())
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m portal_pool",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_seed_arguments(parser)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="{bench}")
    # No parser of its own for the benchmark's options: whatever follows "bench" is
    # handed to the benchmark as is, --help included.
    commands.add_parser(
        "bench",
        add_help=False,
        help="run the benchmark with the arguments that follow (source checkout only)",
    )
    return parser


def _seed_options_given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    defaults = vars(parser.parse_args([]))
    return any(vars(args)[name] != value for name, value in defaults.items() if name != "command")


def _run_bench(argv: list[str]) -> int:
    try:
        bench_run = importlib.import_module("bench.run")
    except ModuleNotFoundError as exc:
        if exc.name in ("bench", "bench.run"):
            print(BENCH_MISSING, file=sys.stderr)
        else:  # the benchmark is there but one of its dependencies is not
            print(f"The benchmark needs {exc.name}: {BENCH_INSTALL}", file=sys.stderr)
        return 2
    bench_main = getattr(bench_run, "main", None)
    if not callable(bench_main):
        # Some other top-level "bench" module shadows the benchmark.
        print(BENCH_MISSING, file=sys.stderr)
        return 2
    status = cast(Callable[[list[str]], "int | None"], bench_main)(argv)
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main())
