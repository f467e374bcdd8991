"""One resource per event loop: opened by ``worker_context``, shared by that loop's tasks.

Many async resources belong to the loop that created them: a database connection pool, an
HTTP client, anything built on that loop's locks, events or streams. The pool's loops must
not share one, and opening one per task is wasteful. ``worker_context`` opens one per
worker, in the worker's own loop, before the worker takes any work, and closes it after its
last task; each task finds it as ``current_worker().context``::

    python examples/worker_resources.py
    python examples/worker_resources.py --backend trio --workers 4 --tasks 20

The connection here is a stand-in with real loop-bound parts: a request/reply wire made of
two anyio memory object streams, answered by a task of the same loop, and a lock that keeps
one request on the wire at a time. It records the thread that opened it and refuses to be
used from any other.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from functools import partial

import anyio

from portal_pool import PortalPool, current_worker

THREAD_PREFIX = "loop"


class WrongLoopError(RuntimeError):
    """A connection was used outside the loop that opened it."""


class Connection:
    """A connection-like object bound to the event loop, and so the thread, that opened it."""

    def __init__(self) -> None:
        self.thread_name = threading.current_thread().name
        self.served = 0
        self._thread_id = threading.get_ident()
        self._requests_out, self._requests_in = anyio.create_memory_object_stream[str]()
        self._replies_out, self._replies_in = anyio.create_memory_object_stream[str]()
        self._lock = anyio.Lock()

    async def request(self, payload: str) -> str:
        """Send ``payload`` and wait for the far end's reply.

        :param payload: the request
        :raises WrongLoopError: if called from a thread other than the one that opened it
        """
        self._check_loop()
        async with self._lock:  # one request on the wire at a time, as on a real connection
            await self._requests_out.send(payload)
            return await self._replies_in.receive()

    async def serve(self) -> None:
        """Be the far end: answer every request until the connection is closed."""
        async with self._requests_in, self._replies_out:
            async for payload in self._requests_in:
                self.served += 1
                await self._replies_out.send(f"{payload}: handled by {self.thread_name}")

    def close(self) -> None:
        """Close the wire; :meth:`serve` then returns."""
        self._check_loop()
        self._requests_out.close()
        self._replies_in.close()

    def _check_loop(self) -> None:
        # A plain check rather than an assert, which python -O would strip.
        if threading.get_ident() != self._thread_id:
            raise WrongLoopError(
                f"connection opened in {self.thread_name} "
                f"used from {threading.current_thread().name}"
            )


class Ledger:
    """What happened to the connections, recorded from the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened: list[str] = []
        self.closed: dict[str, int] = {}  # thread name -> requests served

    def record_open(self, connection: Connection) -> None:
        with self._lock:
            self.opened.append(connection.thread_name)

    def record_close(self, connection: Connection) -> None:
        with self._lock:
            self.closed[connection.thread_name] = connection.served


@asynccontextmanager
async def open_connection(ledger: Ledger) -> AsyncGenerator[Connection, None]:
    """Open a connection in the calling loop, with its far end as a task of the same loop.

    :param ledger: where the opening and the closing are recorded
    """
    connection = Connection()
    ledger.record_open(connection)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(connection.serve)
        try:
            yield connection
        finally:
            connection.close()
    ledger.record_close(connection)


async def handle(job: int) -> tuple[str, str, str]:
    """A task: one request over the connection of the loop it runs in.

    :param job: the job's number
    :return: the thread that ran the task, the thread that opened its connection, the reply
    """
    connection: Connection = current_worker().context
    reply = await connection.request(f"job {job}")
    return threading.current_thread().name, connection.thread_name, reply


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tasks, then print and check what happened to the connections.

    :param argv: the arguments, without the program name; ``None`` means ``sys.argv[1:]``
    :return: 0 if every check passed, else 1
    """
    parser = argparse.ArgumentParser(
        description="Give each event-loop worker its own connection through worker_context."
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--workers", type=int, default=3, metavar="N")
    parser.add_argument("--tasks", type=int, default=12, metavar="N")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.tasks < 1:
        parser.error("--workers and --tasks must be at least 1")

    ledger = Ledger()
    with PortalPool(
        args.workers,
        backend=args.backend,
        worker_context=partial(open_connection, ledger),
        thread_name_prefix=THREAD_PREFIX,
    ) as pool:
        futures = [pool.submit(handle, job) for job in range(args.tasks)]
        outcomes = [future.result() for future in futures]
        try:
            # From the main thread, in a loop of its own: not the connection's loop.
            anyio.run(pool.workers[0].context.request, "stray", backend=args.backend)
        except WrongLoopError as exc:
            refusal: str | None = str(exc)
        else:
            refusal = None
        closed_while_running = len(ledger.closed)

    worker_names = sorted(f"{THREAD_PREFIX}-{index}" for index in range(args.workers))
    per_connection = Counter(opened_by for _, opened_by, _ in outcomes)
    own_loop = all(ran_in == opened_by for ran_in, opened_by, _ in outcomes)
    checks = [
        sorted(ledger.opened) == worker_names,
        own_loop,
        refusal is not None,
        closed_while_running == 0,
        sorted(ledger.closed) == worker_names,
        sum(ledger.closed.values()) == args.tasks,
    ]
    print(f"backend: {args.backend}, {args.workers} workers, {args.tasks} tasks")
    print(f"connections opened: {len(ledger.opened)}, by {', '.join(sorted(ledger.opened))}")
    counts = ", ".join(f"{name}: {count}" for name, count in sorted(per_connection.items()))
    print(f"tasks per connection: {counts}")
    print(f"every task used its own loop's connection: {'yes' if own_loop else 'NO'}")
    print(f"use from another loop: {'NOT refused' if refusal is None else f'refused ({refusal})'}")
    print(f"connections closed while the pool ran: {closed_while_running}")
    print(f"connections closed at shutdown: {len(ledger.closed)}")
    print(f"first reply: {outcomes[0][2]}")
    print("all checks passed" if all(checks) else "SOME CHECKS FAILED")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
