"""A sync Flask app whose views call async code through one shared ``PortalPool``.

Flask views are plain functions, run by the WSGI server's threads. Here they call async
code (anything on asyncio or trio: an async HTTP client, an async database driver) through
one pool that belongs to the app. Each view hands a coroutine function to the pool and
blocks its own thread, never an event loop, until the answer comes or a deadline passes::

    pip install -e '.[trio,examples]'
    python examples/flask_app.py                      # a few requests with the test client
    python examples/flask_app.py --backend trio
    python examples/flask_app.py --serve --port 5000  # the dev server, on 127.0.0.1

**The pool's lifetime is the app's.** ``create_app()`` starts the pool and keeps it in
``app.extensions["portal_pool"]``; every request of every server thread shares it, and with
it one upstream client per worker loop (``worker_context``). It is shut down by
:func:`close_app`, which is registered with ``weakref.finalize``: it runs when the app is
garbage-collected, at interpreter exit (``finalize`` is an ``atexit`` hook), or when called
directly, as tests do, and only once. Flask's ``teardown_appcontext`` and
``teardown_request`` are the wrong hooks: they run after *every* request, and would stop a
pool meant to outlive them. Flask has no "app is stopping" signal; a WSGI app ends when its
process does, so process exit is the app's end. portal_pool's own interpreter-exit hook
already lets submitted work finish there; the ``finalize`` makes the ownership explicit and
also covers apps dropped before exit (tests, several apps in one process).

A pre-forking server (gunicorn) must build the app in each worker process, not in the
master (no ``--preload``): threads, and so the pool's loops, do not survive ``fork()``.

The upstream service here is a stand-in with the shape of a real async client: each call
awaits the network (``anyio.sleep``) and it is opened once per worker loop.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import sys
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
from flask import Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import GatewayTimeout

from portal_pool import PortalPool, current_worker

T = TypeVar("T")

TEMPERATURES = {"paris": 14, "oslo": 3, "lima": 19, "cairo": 27, "quito": 13}


class Upstream:
    """A stand-in async client for a slow weather service, bound to one worker's loop."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.thread_name = threading.current_thread().name
        self.abandoned = 0  # calls cancelled part way, whose clean-up ran

    async def temperature(self, city: str) -> int | None:
        """One call to the service: ``None`` for a city it does not know."""
        await anyio.sleep(self.latency)
        return TEMPERATURES.get(city)

    async def report(self, seconds: float) -> str:
        """A call that takes ``seconds``; what it holds is released if it is cancelled."""
        try:
            await anyio.sleep(seconds)
            return f"report after {seconds} s"
        except anyio.get_cancelled_exc_class():
            self.abandoned += 1  # a real client would close its connection here
            raise


@asynccontextmanager
async def open_upstream(latency: float) -> AsyncGenerator[Upstream, None]:
    """The ``worker_context``: one client per worker loop, for the pool's whole life."""
    yield Upstream(latency)


# -- async code, run in the pool's loops ---------------------------------------------------


async def temperatures(cities: list[str]) -> tuple[dict[str, int | None], str]:
    """Ask for every city at once: the whole takes one call's latency, not one per city."""
    upstream: Upstream = current_worker().context
    found: dict[str, int | None] = {}

    async def one(city: str) -> None:
        found[city] = await upstream.temperature(city)

    async with anyio.create_task_group() as task_group:
        for city in cities:
            task_group.start_soon(one, city)
    return {city: found[city] for city in cities}, upstream.thread_name


async def slow_report(seconds: float) -> str:
    upstream: Upstream = current_worker().context
    return await upstream.report(seconds)


# -- the app ----------------------------------------------------------------------------------


def call_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in the app's pool; give up after ``ASYNC_TIMEOUT`` seconds.

    Giving up cancels the task in its loop (``future.cancel()`` reaches running tasks),
    so an abandoned request leaves nothing running behind it.
    """
    pool: PortalPool[Upstream] = current_app.extensions["portal_pool"]
    future = pool.submit(fn, *args)
    try:
        return future.result(timeout=current_app.config["ASYNC_TIMEOUT"])
    except concurrent.futures.TimeoutError:  # TimeoutError itself from Python 3.11 on
        future.cancel()
        raise GatewayTimeout("the upstream service did not answer in time") from None


def create_app(
    *, backend: str = "asyncio", workers: int = 2, latency: float = 0.2, timeout: float = 1.0
) -> Flask:
    """Build the app and the pool it owns.

    :param backend: the pool's event loops, ``"asyncio"`` or ``"trio"``
    :param workers: the pool's worker threads
    :param latency: seconds each upstream call takes
    :param timeout: seconds a view waits for async code before answering 504
    """
    app = Flask(__name__)
    app.config["ASYNC_TIMEOUT"] = timeout
    pool = PortalPool(
        workers,
        backend=backend,
        worker_context=partial(open_upstream, latency),
        thread_name_prefix="flask-pool",
    )
    app.extensions["portal_pool"] = pool
    # Not a teardown hook (those run after every request): see the module's docstring.
    app.extensions["portal_pool_finalizer"] = weakref.finalize(app, pool.shutdown)

    @app.get("/weather")
    def weather() -> ResponseReturnValue:
        cities = [city for city in request.args.get("cities", "").split(",") if city]
        if not cities:
            return jsonify(error="give ?cities=a,b,..."), 400
        started = time.perf_counter()
        found, thread_name = call_async(temperatures, cities)
        elapsed = round(time.perf_counter() - started, 3)
        unknown = [city for city, value in found.items() if value is None]
        if unknown:
            return jsonify(unknown=unknown), 404
        return jsonify(temperatures=found, loop=thread_name, elapsed=elapsed)

    @app.get("/report")
    def report() -> ResponseReturnValue:
        seconds = float(request.args.get("seconds", "0"))
        return jsonify(report=call_async(slow_report, seconds))

    @app.get("/stats")
    def stats() -> ResponseReturnValue:
        return jsonify(dataclasses.asdict(pool.stats()))

    return app


def close_app(app: Flask) -> None:
    """Shut the app's pool down, waiting for its tasks' clean-up. Safe to repeat."""
    app.extensions["portal_pool_finalizer"]()


# -- the demo -------------------------------------------------------------------------------


def demo(backend: str, workers: int) -> bool:
    """A few requests through Flask's test client; print them; return whether all went well."""
    latency, timeout = 0.2, 0.5
    app = create_app(backend=backend, workers=workers, latency=latency, timeout=timeout)
    pool: PortalPool[Upstream] = app.extensions["portal_pool"]
    upstreams = [worker.context for worker in pool.workers]  # gone from workers at shutdown
    client = app.test_client()
    print(f"backend: {backend}, {workers} workers, upstream latency {latency} s")
    try:
        cities = "paris,oslo,lima,cairo,quito"
        found = client.get(f"/weather?cities={cities}")
        body = found.get_json()
        print(
            f"GET /weather?cities={cities} -> {found.status_code} {body['temperatures']} "
            f"in {body['elapsed']:.2f} s, from {body['loop']}"
        )
        missing = client.get("/weather?cities=paris,atlantis")
        print(f"GET /weather?cities=paris,atlantis -> {missing.status_code} {missing.get_json()}")

        # Every request, from every server thread, shares the one pool.
        statuses: list[int] = []
        lock = threading.Lock()

        def request_in_thread() -> None:
            status = app.test_client().get("/weather?cities=oslo").status_code
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=request_in_thread) for _ in range(8)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together = time.perf_counter() - started
        print(f"8 requests from 8 threads -> {sorted(set(statuses))} in {together:.2f} s")

        started = time.perf_counter()
        late = client.get("/report?seconds=30")
        waited = time.perf_counter() - started
        print(f"GET /report?seconds=30 -> {late.status_code} after {waited:.2f} s")
    finally:
        close_app(app)  # waits for the cancelled report's clean-up
    abandoned = sum(upstream.abandoned for upstream in upstreams)
    stats = pool.stats()
    print(f"cancelled upstream calls cleaned up: {abandoned}")
    print(f"pool: completed {stats.completed}, cancelled {stats.cancelled}, failed {stats.failed}")
    return (
        found.status_code == 200
        and body["temperatures"] == {city: TEMPERATURES[city] for city in cities.split(",")}
        and body["elapsed"] < 5 * latency  # five calls at once, not one after another
        and missing.status_code == 404
        and statuses == [200] * 8
        and late.status_code == 504
        and abandoned == 1
        and stats.cancelled == 1
        and stats.failed == 0
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo, or serve the app on 127.0.0.1.

    :param argv: the arguments, without the program name; ``None`` means ``sys.argv[1:]``
    """
    parser = argparse.ArgumentParser(description="A Flask app calling async code via a pool.")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--workers", type=int, default=2, metavar="N")
    parser.add_argument("--serve", action="store_true", help="run Flask's development server")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.serve:
        app = create_app(backend=args.backend, workers=args.workers)
        try:
            app.run(host="127.0.0.1", port=args.port, threaded=True)
        finally:
            close_app(app)
        return 0
    ok = demo(args.backend, args.workers)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
