"""Nothing the pool holds keeps a call's result, arguments or callable alive once settled.

CPython's ``test_free_reference`` checks the same for ``map``, right after each result
(see test_stdlib_executor.py); these checks cover every way in and every outcome.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool

MakePool = Callable[..., PortalPool[Any]]


class Payload:
    """An argument, a result or an error's content: something whose lifetime we watch."""


class Failure(Exception):
    pass


def _make_call(kind: str) -> Callable[[Payload], Any]:
    """A fresh callable (so its own lifetime can be watched) returning a fresh Payload."""
    if kind == "sync":

        def call(arg: Payload) -> Payload:
            return Payload()

    elif kind == "async":

        async def call(arg: Payload) -> Payload:
            await anyio.sleep(0)
            return Payload()

    else:

        def call(arg: Payload) -> Payload:
            raise Failure(Payload())

    return call


def _outcome(future: Future[Any]) -> Any:
    error = future.exception(timeout=10)
    return error if error is not None else future.result()


def _outcomes(futures: deque[Future[Any]]) -> Iterator[Any]:
    while futures:
        # No local holds the outcome at the yield: a suspended generator keeps its locals.
        yield _outcome(futures.popleft())


def _start(
    pool: PortalPool[Any], api: str, kind: str
) -> tuple[Iterator[Any], dict[str, weakref.ref[Any]]]:
    """Start six calls; return their outcomes as the caller receives them, and weak
    references to the callable and the arguments, which only the pool now holds."""
    fn = _make_call(kind)
    args = [Payload() for _ in range(6)]
    watched: dict[str, weakref.ref[Any]] = {"callable": weakref.ref(fn)}
    watched.update({f"argument {n}": weakref.ref(arg) for n, arg in enumerate(args)})
    if api == "submit":
        return _outcomes(deque(pool.submit(fn, arg) for arg in args)), watched
    if api == "map":
        return pool.map(fn, args), watched
    if api == "map_chunked":
        return pool.map(fn, args, chunksize=4), watched
    return pool.map_unordered(fn, args), watched


def _after_loop_steps(pool: PortalPool[Any]) -> None:
    """Return once every worker's loop has finished the step it was in.

    Through each worker's portal, not through the pool: a call through the pool would
    itself take the place of the last call in whatever still held that, and hide it.
    """
    for worker in pool.workers:
        worker.portal.call(lambda: None)


# A map stops at its first error, so calls that raise go through submit only.
CASES = [
    ("submit", "sync"),
    ("submit", "async"),
    ("submit", "raises"),
    ("map", "sync"),
    ("map", "async"),
    ("map_chunked", "sync"),
    ("map_chunked", "async"),
    ("map_unordered", "sync"),
    ("map_unordered", "async"),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("api", "kind"), CASES)
def test_settled_call_leaves_nothing_alive(make_pool: MakePool, api: str, kind: str) -> None:
    pool = make_pool(2)
    outcomes, watched = _start(pool, api, kind)
    received = 0
    for outcome in outcomes:
        # As in CPython's test_free_reference: once the caller drops what it received,
        # nothing else may hold it (the worker that produced it has moved on).
        ref = weakref.ref(outcome.args[0] if kind == "raises" else outcome)
        del outcome
        _after_loop_steps(pool)
        gc.collect()
        assert ref() is None, f"outcome {received} is still alive: {gc.get_referrers(ref())}"
        received += 1
    assert received == 6
    del outcomes
    _after_loop_steps(pool)
    gc.collect()
    alive = [name for name, ref in watched.items() if ref() is not None]
    assert not alive, f"still alive after every call settled: {alive}"


@pytest.mark.timeout(20)
def test_cancelled_call_leaves_nothing_alive(make_pool: MakePool) -> None:
    pool = make_pool(1)
    started = threading.Event()
    ended = threading.Event()

    def start() -> tuple[Future[Any], dict[str, weakref.ref[Any]]]:
        async def call(arg: Payload) -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                ended.set()

        arg = Payload()
        watched: dict[str, weakref.ref[Any]] = {
            "callable": weakref.ref(call),
            "argument": weakref.ref(arg),
        }
        return pool.submit(call, arg), watched

    future, watched = start()
    assert started.wait(10)
    assert future.cancel()
    assert ended.wait(10)
    del future
    _after_loop_steps(pool)  # the step that ran the call's finally is over
    gc.collect()
    alive = [name for name, ref in watched.items() if ref() is not None]
    assert not alive, f"still alive after the call was cancelled: {alive}"
