"""A trio program using an asyncio-only library, through a pool of asyncio loops.

Here the asyncio-only library is asyncio's own streams: ``asyncio.start_server`` and
``asyncio.open_connection``, which need a running asyncio loop and cannot be called from
trio. The pool's one asyncio worker starts an echo server on 127.0.0.1 in its
``worker_context``; the trio program then makes echo round trips with
``await pool.run_async(...)``, which never blocks trio's loop::

    python examples/trio_uses_asyncio.py
    python examples/trio_uses_asyncio.py --rounds 5 --timeout 0.2

Cancellation crosses over too: a trio ``move_on_after`` around a ``run_async`` call that
waits for a reply that never comes cancels the asyncio task, and ``run_async`` returns
only once that task's ``finally`` has run, so its clean-up is done when trio moves on.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager

import trio

from portal_pool import PortalPool, current_worker

HOST = "127.0.0.1"
NO_REPLY = b"NO REPLY\n"  # a request the server reads but never answers


async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo each line back, except :data:`NO_REPLY`, until the client hangs up."""
    try:
        while line := await reader.readline():
            if line != NO_REPLY:
                writer.write(line)
                await writer.drain()
    finally:
        writer.close()


@asynccontextmanager
async def echo_server() -> AsyncGenerator[int, None]:
    """Run an echo server in the worker's asyncio loop for the pool's lifetime.

    Yields the port it listens on, which tasks read as ``current_worker().context``.
    """
    server = await asyncio.start_server(serve_client, HOST, 0)
    async with server:  # closes the server when the worker stops
        yield server.sockets[0].getsockname()[1]


async def echo(message: str) -> tuple[str, str]:
    """One round trip to the worker's echo server, with asyncio's client streams.

    :param message: one line of text
    :return: the reply and the thread that made the call
    """
    port: int = current_worker().context
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"{message}\n".encode())
        await writer.drain()
        reply = await reader.readline()
    finally:
        writer.close()
    return reply.decode().rstrip("\n"), threading.current_thread().name


async def wait_for_no_reply(log: list[str]) -> bytes:
    """Send :data:`NO_REPLY` and wait for the answer, which never comes.

    :param log: what happened on the asyncio side, appended as it happens
    """
    port: int = current_worker().context
    writer: asyncio.StreamWriter | None = None
    try:
        # Inside the try: trio's deadline may fall while this is still connecting.
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(NO_REPLY)
        await writer.drain()
        return await reader.readline()
    except asyncio.CancelledError:
        log.append("asyncio.CancelledError raised in the task")
        raise
    finally:
        if writer is not None:
            writer.close()
        log.append("finally ran")


async def trio_main(pool: PortalPool[int], rounds: int, timeout: float) -> bool:
    """The trio program: concurrent echo round trips, then a call trio gives up on.

    :param pool: an asyncio pool whose workers run :func:`echo_server`
    :param rounds: the number of round trips
    :param timeout: seconds trio waits for the call that gets no reply
    :return: whether everything went as described above
    """
    messages = [f"hello {index} from trio" for index in range(rounds)]
    replies: dict[int, tuple[str, str]] = {}

    async def round_trip(index: int) -> None:
        replies[index] = await pool.run_async(echo, messages[index])

    async with trio.open_nursery() as nursery:
        for index in range(rounds):
            nursery.start_soon(round_trip, index)
    for index, message in enumerate(messages):
        reply, thread = replies[index]
        print(f"echo {index}: sent {message!r}, got {reply!r} (asyncio streams in {thread})")

    log: list[str] = []
    started = trio.current_time()
    with trio.move_on_after(timeout) as scope:
        await pool.run_async(wait_for_no_reply, log)
    waited = trio.current_time() - started
    # run_async has waited for the asyncio task to finish: its log is complete here.
    outcome = "cancelled by trio" if scope.cancelled_caught else "NOT cancelled"
    print(f"no-reply call: {outcome} after {waited:.2f} s")
    print(f"asyncio side: {'; '.join(log)}")
    return (
        [replies[index][0] for index in range(rounds)] == messages
        and scope.cancelled_caught
        and log == ["asyncio.CancelledError raised in the task", "finally ran"]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Start the asyncio pool, run the trio program, report.

    :param argv: the arguments, without the program name; ``None`` means ``sys.argv[1:]``
    :return: 0 if everything went as expected, else 1
    """
    parser = argparse.ArgumentParser(
        description="Use asyncio's streams from a trio program through a PortalPool."
    )
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="echo round trips")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="how long trio waits for the reply that never comes",
    )
    args = parser.parse_args(argv)
    if args.rounds < 0 or not args.timeout >= 0:
        parser.error("--rounds and --timeout must not be negative")
    # The pool is started and stopped outside trio.run: both block for a moment, which
    # code inside a trio loop should not do.
    with PortalPool(1, backend="asyncio", worker_context=echo_server) as pool:
        port = pool.workers[0].context
        print(f"trio program in {threading.current_thread().name}; echo server on {HOST}:{port}")
        ok = trio.run(trio_main, pool, args.rounds, args.timeout)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
