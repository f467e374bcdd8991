"""worker_context: one resource per worker loop, entered before work and exited after it."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool, current_worker


class LoopResource:
    """Stands in for an httpx.AsyncClient or a DB pool: bound to the loop that made it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.uses = 0
        self.closed = False

    async def use(self) -> int:
        assert threading.get_ident() == self.thread, "used from another loop"
        assert not self.closed
        await anyio.sleep(0)
        self.uses += 1
        return self.thread


def test_each_worker_enters_once_in_its_own_loop(backend_kwargs: dict[str, Any]) -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    resources: list[LoopResource] = []

    @asynccontextmanager
    async def per_loop() -> AsyncIterator[LoopResource]:
        resource = LoopResource()
        with lock:
            events.append(("enter", resource.thread))
            resources.append(resource)
        try:
            yield resource
        finally:
            await anyio.sleep(0)  # async cleanup runs in the same loop
            resource.closed = True
            with lock:
                events.append(("exit", resource.thread))

    async def task() -> tuple[int, int]:
        worker = current_worker()
        return worker.index, await worker.context.use()

    with PortalPool(3, worker_context=per_loop, **backend_kwargs) as pool:
        assert len(resources) == 3  # all entered before the constructor returned
        results = [pool.submit(task).result(timeout=10) for _ in range(12)]
        contexts = [w.context for w in pool.workers]
        assert {id(c) for c in contexts} == {id(r) for r in resources}  # one each
        threads = {w.index: w.context.thread for w in pool.workers}
    assert all(threads[index] == thread for index, thread in results)
    assert sorted(kind for kind, _ in events) == ["enter"] * 3 + ["exit"] * 3
    assert all(r.closed and r.uses == 4 for r in resources)


def test_context_exits_after_the_last_task(backend_kwargs: dict[str, Any]) -> None:
    order: list[str] = []

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
    assert order == ["task end", "context exit"]


def test_context_exit_error_is_logged_and_shutdown_completes(
    backend_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    @asynccontextmanager
    async def broken_exit() -> AsyncIterator[None]:
        yield
        raise OSError("close failed")

    pool = PortalPool(2, worker_context=broken_exit, **backend_kwargs)
    assert pool.run(lambda: 5) == 5
    pool.shutdown(wait=True)
    assert not any(w._host_loop.is_alive() for w in pool.workers)
    errors = [r for r in caplog.records if r.name == "portal_pool" and r.exc_info]
    assert len(errors) == 2
    assert all("close failed" in str(r.exc_info[1]) for r in errors if r.exc_info)
