"""HTTP fan-out: thousands of requests through one ``httpx.AsyncClient`` per event loop.

An ``httpx.AsyncClient`` holds a connection pool that belongs to the event loop that opened
it, so each worker gets its own through ``worker_context``: opened in the worker's loop
before it takes work, closed there after its last request. Tasks find it as
``current_worker().context``. ``max_concurrency`` keeps each worker at most as busy as its
client has connections, so no request waits inside httpx's pool and times out there::

    pip install -e '.[trio,examples]'
    python examples/http_fanout.py                          # asyncio, 2,000 URLs
    python examples/http_fanout.py --backend trio --workers 4

The server is started by the example itself, on 127.0.0.1 and a free port: hypercorn (an
ASGI server that runs on asyncio and on trio) serving a twenty-line ASGI app, in a thread
of its own with its own event loop of the same backend, behind an anyio blocking portal.
It is handed an already-bound listening socket (``fd://``), so the port is known before
the first request and no request can arrive before the socket listens. Nothing else is
contacted: the clients ignore proxy settings from the environment. Server and clients share
one process, and so one GIL, here: the rate printed is a floor, not what either reaches alone.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial

import anyio
import httpx
from anyio.from_thread import start_blocking_portal
from hypercorn.config import Config
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)

from portal_pool import PortalPool, current_worker

HOST = "127.0.0.1"


# -- the server ----------------------------------------------------------------------------


def expected_body(path: str) -> bytes:
    """What the server answers for ``path``; the client checks every body against it."""
    return f"you asked for {path}\n".encode()


async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """A minimal ASGI application: every GET path answers with its own name."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = expected_body(scope["path"])
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    start = HTTPResponseStartEvent(
        type="http.response.start", status=200, headers=headers, trailers=False
    )
    await send(start)
    await send(HTTPResponseBodyEvent(type="http.response.body", body=body, more_body=False))


async def serve(backend: str, config: Config, stop: anyio.Event) -> None:
    """Run hypercorn on the running loop until ``stop`` is set."""
    if backend == "trio":
        from hypercorn.trio import serve as serve_trio

        await serve_trio(app, config, shutdown_trigger=stop.wait)
    else:
        from hypercorn.asyncio import serve as serve_asyncio

        await serve_asyncio(app, config, shutdown_trigger=stop.wait)


@contextmanager
def running_server(backend: str) -> Iterator[str]:
    """Serve :func:`app` on 127.0.0.1 from a thread of its own; yield the base URL.

    :param backend: the server's event loop, ``"asyncio"`` or ``"trio"``
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns and closes it from here
    config.errorlog = None  # hypercorn would log "Running on ..." to stderr
    config.backlog = 1024
    with start_blocking_portal(backend) as portal:
        stop = portal.call(anyio.Event)  # an event of the server's own loop
        served = portal.start_task_soon(serve, backend, config, stop)
        try:
            yield f"http://{HOST}:{port}"
        finally:
            portal.call(stop.set)
            served.result()  # graceful: open connections are closed first


# -- the clients, one per worker ------------------------------------------------------------


class Client:
    """One worker's ``httpx.AsyncClient``, and how many requests went through it."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.thread_name = threading.current_thread().name
        self.requests = 0


@asynccontextmanager
async def open_client(base_url: str, connections: int) -> AsyncGenerator[Client, None]:
    """The ``worker_context``: one client per worker loop, closed after its last request.

    :param base_url: the server's address
    :param connections: the most connections the client opens (and keeps alive)
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, trust_env=False) as http:
        yield Client(http)


async def fetch(path: str) -> tuple[str, bool]:
    """GET ``path`` with this worker's client.

    :return: the name of the worker thread, and whether the answer was the expected one
    """
    client: Client = current_worker().context
    response = await client.http.get(path)
    client.requests += 1
    ok = response.status_code == 200 and response.content == expected_body(path)
    return client.thread_name, ok


# -- the program ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server, fetch every URL through the pool, report and check.

    :param argv: the arguments, without the program name; ``None`` means ``sys.argv[1:]``
    :return: 0 if every URL was fetched with the expected answer, else 1
    """
    parser = argparse.ArgumentParser(
        description="Fetch many URLs from a local server with one httpx client per worker."
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--workers", type=int, default=2, metavar="N")
    parser.add_argument("--urls", type=int, default=2_000, metavar="N")
    parser.add_argument(
        "--connections", type=int, default=10, metavar="N", help="per worker (default: 10)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.urls < 1 or args.connections < 1:
        parser.error("--workers, --urls and --connections must be at least 1")

    paths = [f"/items/{index}" for index in range(args.urls)]
    with running_server(args.backend) as base_url:
        print(f"server: hypercorn ({args.backend}) on {base_url}")
        with PortalPool(
            args.workers,
            backend=args.backend,
            worker_context=partial(open_client, base_url, args.connections),
            max_concurrency=args.connections,
            thread_name_prefix="fetcher",
        ) as pool:
            started = time.perf_counter()
            # Lazy and bounded: at most 4 x workers x connections requests in flight.
            window = 4 * args.workers * args.connections
            outcomes = list(pool.map(fetch, paths, buffersize=window))
            elapsed = time.perf_counter() - started
            per_client = {worker.context.thread_name: 0 for worker in pool.workers}
            per_client.update(Counter(thread for thread, _ in outcomes))
            counted = sum(worker.context.requests for worker in pool.workers)

    good = sum(ok for _, ok in outcomes)
    print(
        f"backend: {args.backend}, {args.workers} workers, {args.urls} URLs, "
        f"at most {args.connections} requests at a time per worker"
    )
    print(f"fetched: {len(outcomes)}, expected answers: {good}")
    counts = ", ".join(f"{name}: {count}" for name, count in sorted(per_client.items()))
    print(f"requests per client: {counts}")
    print(f"elapsed: {elapsed:.2f} s ({len(outcomes) / elapsed:,.0f} requests/s)")
    ok = len(outcomes) == good == counted == args.urls
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
