"""worker_context: one resource per worker loop, entered before work and exited after it.

On the process host each worker process enters it in its own loop: the value lives
there, and tasks read it as ``current_worker().context``; the parent cannot.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from portal_pool import BrokenPortalPool, PortalPool, current_worker

HOSTS = ("thread", "process", "ray")

# Where a loop runs: its process and its thread.
Where = tuple[int, int]


class LoopResource:
    """Stands in for an httpx.AsyncClient or a DB pool: bound to the loop that made it."""

    def __init__(self) -> None:
        self.where: Where = (os.getpid(), threading.get_ident())
        self.uses = 0
        self.closed = False

    async def use(self) -> Where:
        assert (os.getpid(), threading.get_ident()) == self.where, "used from another loop"
        assert not self.closed
        await anyio.sleep(0)
        self.uses += 1
        return self.where


def live_worker_processes() -> list[str]:
    return [
        f"{child.name} (pid {child.pid})"
        for child in multiprocessing.active_children()
        if child.name.startswith("portal_pool")
    ]


def test_each_worker_enters_once_in_its_own_loop(
    backend_kwargs: dict[str, Any], shared: Any, pool_host: str
) -> None:
    # ("enter", index, where) and ("exit", index, where, uses), from each worker's loop.
    events = shared.list()

    @asynccontextmanager
    async def per_loop() -> AsyncIterator[LoopResource]:
        resource = LoopResource()
        index = current_worker().index
        events.append(("enter", index, resource.where))
        try:
            yield resource
        finally:
            await anyio.sleep(0)  # async cleanup runs in the same loop
            resource.closed = True
            events.append(("exit", index, resource.where, resource.uses))

    async def task() -> tuple[int, Where]:
        worker = current_worker()
        return worker.index, await worker.context.use()

    with PortalPool(3, worker_context=per_loop, **backend_kwargs) as pool:
        entered = list(events)  # all entered before the constructor returned
        assert sorted(index for _, index, _ in entered) == [0, 1, 2]
        where = {index: place for _, index, place in entered}
        results = [pool.submit(task).result(timeout=10) for _ in range(12)]
        pids = [worker.pid for worker in pool.workers]
        if pool_host == "thread":
            contexts = [worker.context for worker in pool.workers]
            assert [context.where for context in contexts] == [where[i] for i in range(3)]
        else:
            for worker in pool.workers:
                with pytest.raises(RuntimeError, match=lives_in_child(worker.pid, "context")):
                    _ = worker.context
                with pytest.raises(RuntimeError, match=lives_in_child(worker.pid, "portal")):
                    _ = worker.portal
    # Each task ran in its worker's own loop, and used the resource entered there.
    assert sorted(index for index, _ in results) == [0] * 4 + [1] * 4 + [2] * 4
    assert all(place == where[index] for index, place in results)
    assert [where[index][0] for index in range(3)] == pids
    if pool_host == "thread":
        assert set(pids) == {os.getpid()}
    else:  # one process each, with the index it has in the parent's pool
        assert len(set(pids)) == 3
        assert os.getpid() not in pids
    exits = sorted(event[1:] for event in events if event[0] == "exit")
    assert exits == [(index, where[index], 4) for index in range(3)]


def lives_in_child(pid: int, what: str) -> str:
    """What reading a worker process's ``what`` in the parent says."""
    return re.escape(
        f"{what} lives in its process (pid {pid}), not in this one; "
        f"read current_worker().{what} inside a task instead"
    )


def test_context_exits_after_the_last_task(backend_kwargs: dict[str, Any], shared: Any) -> None:
    order = shared.list()

    @asynccontextmanager
    async def tracked() -> AsyncIterator[str]:
        yield "resource"
        order.append("context exit")

    async def last_task() -> None:
        await anyio.sleep(0.05)
        assert current_worker().context == "resource"
        order.append("task end")

    pool = PortalPool(1, worker_context=tracked, **backend_kwargs)
    pool.submit(last_task)
    pool.shutdown(wait=True)
    assert list(order) == ["task end", "context exit"]


def test_context_exit_error_is_logged_and_shutdown_completes(
    backend_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture, pool_host: str
) -> None:
    @asynccontextmanager
    async def broken_exit() -> AsyncIterator[None]:
        yield
        raise OSError("close failed")

    pool = PortalPool(2, worker_context=broken_exit, **backend_kwargs)
    assert pool.run(lambda: 5) == 5
    pool.shutdown(wait=True)
    assert not any(w._host_loop.is_alive() for w in pool.workers)
    errors = [r for r in caplog.records if r.name == "portal_pool" and r.levelno >= logging.ERROR]
    assert len(errors) == 2
    if pool_host == "thread":
        assert all("close failed" in str(r.exc_info[1]) for r in errors if r.exc_info)
        assert all(r.exc_info for r in errors)
    else:
        # Logged by the parent for the child: the traceback comes as the message's text.
        assert all("OSError: close failed" in r.getMessage() for r in errors)


def test_a_failing_worker_context_fails_the_constructor_and_leaves_nothing(
    backend_kwargs: dict[str, Any],
) -> None:
    @asynccontextmanager
    async def no_database() -> AsyncIterator[None]:
        if current_worker().index == 1:
            raise ConnectionError("no database")
        yield

    with pytest.raises(BrokenPortalPool, match="a worker failed to start") as caught:
        PortalPool(2, worker_context=no_database, **backend_kwargs)
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert str(caught.value.__cause__) == "no database"
    # Not even the worker whose context was entered: stopped and joined by then.
    assert live_worker_processes() == []


@pytest.mark.hosts("process", "ray")
def test_a_replacement_worker_process_enters_the_context_again(
    backend_kwargs: dict[str, Any], shared: Any
) -> None:
    entries = shared.list()

    @asynccontextmanager
    async def counted() -> AsyncIterator[int]:
        entries.append(os.getpid())
        yield os.getpid()

    def context_of_this_process() -> tuple[int, int]:
        return current_worker().context, os.getpid()

    with PortalPool(1, worker_context=counted, **backend_kwargs) as pool:
        first = pool.workers[0].pid
        assert pool.run(context_of_this_process) == (first, first)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool.workers[0].pid == first:  # until a replacement has started
            assert time.monotonic() < deadline
            time.sleep(0.005)
        second = pool.workers[0].pid
        assert pool.run(context_of_this_process) == (second, second)
    assert list(entries) == [first, second]
