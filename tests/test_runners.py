"""How calls run inside a worker's loop: their context, and trio's pooled runner tasks."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import anyio

from portal_pool import PortalPool
from portal_pool._trio_runtime import PARKED_RUNNERS_MAX

from .conftest import requires_trio

MakePool = Callable[..., PortalPool[Any]]

request_id: ContextVar[str] = ContextVar("request_id", default="unset")


async def read_and_set(value: str) -> str:
    seen = request_id.get()
    request_id.set(value)
    await anyio.sleep(0)
    assert request_id.get() == value  # kept across the call's own steps
    return seen


def test_each_call_starts_in_a_fresh_copy_of_the_worker_context(
    backend_kwargs: dict[str, Any],
) -> None:
    @asynccontextmanager
    async def per_loop() -> AsyncIterator[None]:
        request_id.set("from worker_context")
        yield

    request_id.set("from the submitter")  # not the worker's: calls do not see it
    with PortalPool(1, worker_context=per_loop, **backend_kwargs) as pool:
        seen = [pool.run(read_and_set, f"call {n}") for n in range(20)]
        concurrent = [pool.submit(read_and_set, f"batch {n}") for n in range(20)]
        seen += [future.result(timeout=10) for future in concurrent]
    assert seen == ["from worker_context"] * 40


def test_a_call_can_wait_for_a_call_submitted_after_it(make_pool: MakePool) -> None:
    """The call that holds the loop's attention must not stop the next ones arriving."""
    pool = make_pool(1)
    worker = pool.workers[0]
    first_started = threading.Event()

    async def make_event() -> anyio.Event:
        return anyio.Event()

    later_done = worker.run(make_event)

    async def first() -> str:
        first_started.set()
        await later_done.wait()
        return "first"

    async def later() -> str:
        later_done.set()
        return "later"

    for _ in range(3):  # the same hand-over again, once runners have been reused
        later_done = worker.run(make_event)
        waiting = worker.submit(first)
        assert first_started.wait(10)
        assert worker.submit(later).result(timeout=10) == "later"
        assert waiting.result(timeout=10) == "first"
        first_started.clear()


def test_a_cancelled_call_leaves_its_worker_serving(make_pool: MakePool) -> None:
    pool = make_pool(1)
    started = threading.Event()

    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    for _ in range(3):
        future = pool.submit(hang)
        assert started.wait(10)
        started.clear()
        assert future.cancel()
        assert pool.run(read_and_set, "after") == "unset"


def test_a_call_that_swallows_its_cancellation_spoils_no_later_call(
    make_pool: MakePool,
) -> None:
    pool = make_pool(1)
    started = threading.Event()

    async def swallow() -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return "swallowed"  # bad manners, but the worker must survive them
        return "unreachable"

    async def checkpoints() -> str:
        for _ in range(3):
            await anyio.sleep(0)
        return "done"

    future = pool.submit(swallow)
    assert started.wait(10)
    assert future.cancel()
    # The runner that ran it takes later calls in turn: none of them may be cancelled.
    assert [pool.run(checkpoints) for _ in range(6)] == ["done"] * 6
    assert future.cancelled()


@requires_trio
def test_trio_keeps_a_bounded_number_of_idle_runners() -> None:
    with PortalPool(1, backend="trio") as pool:
        worker = pool.workers[0]
        calls = PARKED_RUNNERS_MAX * 2
        all_started = threading.Event()
        started = [0]

        async def make_event() -> anyio.Event:
            return anyio.Event()

        release = worker.run(make_event)

        async def wait_for_release() -> None:
            started[0] += 1  # in the loop thread only
            if started[0] == calls:
                all_started.set()
            await release.wait()

        async def release_all() -> None:
            release.set()

        async def runner_tasks() -> int:
            import trio

            nursery = trio.lowlevel.current_task().parent_nursery
            assert nursery is not None
            return len(nursery.child_tasks)

        futures = [worker.submit(wait_for_release) for _ in range(calls)]
        assert all_started.wait(10)
        assert worker.run(runner_tasks) > calls  # one runner per concurrent call
        worker.run(release_all)
        for future in futures:
            future.result(timeout=10)
        # The parked ones, plus the leader that runs this call.
        assert worker.run(runner_tasks) <= PARKED_RUNNERS_MAX + 1


class LoopHeld:
    """Holds a worker's loop in a sync call, so that what is submitted meanwhile reaches
    the loop as one burst, taken at one wake-up, once :meth:`release` lets it go."""

    def __init__(self, worker: Any) -> None:
        self._gate = threading.Event()
        self._holding = threading.Event()
        self.future = worker.submit(self._hold)
        assert self._holding.wait(10)

    def _hold(self) -> None:
        self._holding.set()
        assert self._gate.wait(10)

    def release(self) -> None:
        self._gate.set()
        self.future.result(timeout=10)


def set_without_waiting(value: str) -> str:
    seen = request_id.get()
    request_id.set(value)
    return seen


async def set_without_waiting_async(value: str) -> str:
    return set_without_waiting(value)


def test_each_call_of_one_burst_starts_in_a_fresh_context(backend_kwargs: dict[str, Any]) -> None:
    """On trio a burst's calls that never wait run one after another in one step of
    the leader's task; each must still start in its own copy of the worker's context."""

    @asynccontextmanager
    async def per_loop() -> AsyncIterator[None]:
        request_id.set("from worker_context")
        yield

    with PortalPool(1, worker_context=per_loop, **backend_kwargs) as pool:
        held = LoopHeld(pool.workers[0])
        burst = [
            pool.submit(fn, f"call {n}")
            for n in range(10)
            for fn in (set_without_waiting, set_without_waiting_async)
        ]
        held.release()
        seen = [future.result(timeout=10) for future in burst]
    assert seen == ["from worker_context"] * 20


def test_a_call_that_waits_does_not_hold_up_the_rest_of_its_burst(make_pool: MakePool) -> None:
    """The burst's first call waits for its last: the calls between must be handed on."""
    pool = make_pool(1)
    worker = pool.workers[0]

    async def make_event() -> anyio.Event:
        return anyio.Event()

    for position in range(3):  # the waiting call first, in the middle, and last but one
        last_ran = worker.run(make_event)

        async def wait_for_last(done: anyio.Event = last_ran) -> str:
            await done.wait()
            return "waited"

        async def last(done: anyio.Event = last_ran) -> str:
            done.set()
            return "last"

        held = LoopHeld(worker)
        burst = [worker.submit(set_without_waiting, "x") for _ in range(position * 3)]
        waiting = worker.submit(wait_for_last)
        burst += [worker.submit(set_without_waiting_async, "y") for _ in range(3)]
        final = worker.submit(last)
        held.release()
        assert final.result(timeout=10) == "last"
        assert waiting.result(timeout=10) == "waited"
        assert all(future.result(timeout=10) == "unset" for future in burst)
        # ... and a later burst is served: somebody leads again.
        assert worker.run(set_without_waiting, "z") == "unset"


def test_the_waiting_call_of_a_burst_can_be_cancelled(make_pool: MakePool) -> None:
    pool = make_pool(1)
    worker = pool.workers[0]
    started = threading.Event()
    cleaned_up = threading.Event()

    async def hang() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned_up.set()

    held = LoopHeld(worker)
    before = worker.submit(set_without_waiting_async, "before")
    hanging = worker.submit(hang)
    after = worker.submit(set_without_waiting_async, "after")
    held.release()
    assert started.wait(10)
    assert before.result(timeout=10) == after.result(timeout=10) == "unset"
    assert hanging.cancel()
    assert cleaned_up.wait(10)
    assert worker.run(read_and_set, "later") == "unset"
    assert pool.stats().cancelled == 1


class Awaitable:
    """Not a coroutine: an object whose ``__await__`` runs one."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __await__(self) -> Any:
        return self._checkpoint_then_return().__await__()

    async def _checkpoint_then_return(self) -> str:
        await anyio.sleep(0)
        return self._value


def test_a_call_returning_an_awaitable_that_is_not_a_coroutine(make_pool: MakePool) -> None:
    pool = make_pool(1)
    worker = pool.workers[0]
    assert worker.run(Awaitable, "alone") == "alone"
    held = LoopHeld(worker)
    burst = [worker.submit(Awaitable, f"in a burst {n}") for n in range(3)]
    held.release()
    assert [future.result(timeout=10) for future in burst] == [f"in a burst {n}" for n in range(3)]


class Payload:
    """A result whose lifetime the test watches."""


def test_a_runner_handed_a_call_keeps_nothing_of_it_while_it_waits(make_pool: MakePool) -> None:
    """On trio the call after a waiting one goes to another runner (a new one, then
    parked ones), which then parks: nothing it keeps while parked may hold the call's
    future, and so its result."""
    pool = make_pool(1)
    worker = pool.workers[0]

    async def make_event() -> anyio.Event:
        return anyio.Event()

    for _ in range(3):
        released = worker.run(make_event)

        async def wait_for_release(event: anyio.Event = released) -> None:
            await event.wait()

        async def release(event: anyio.Event = released) -> None:
            event.set()

        held = LoopHeld(worker)
        waiting = worker.submit(wait_for_release)
        handed_on = worker.submit(Payload)
        held.release()
        result = weakref.ref(handed_on.result(timeout=10))
        del handed_on
        worker.portal.call(lambda: None)  # the loop has moved past that call's last step
        gc.collect()
        assert result() is None, gc.get_referrers(result())
        worker.run(release)
        waiting.result(timeout=10)
