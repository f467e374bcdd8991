"""Shutdown, context managers, and calls that must fail fast instead of deadlocking.

On both hosts; the tasks share events, locks and lists with the test through ``shared``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anyio
import pytest

from portal_pool import PortalPool, current_worker

from .conftest import POOL_BACKENDS, requires_trio

MakePool = Callable[..., PortalPool[Any]]

HOSTS = ("thread", "process", "ray")


class Gated:
    """A task body that runs until the test opens the gate, or until it is cancelled;
    counts the tasks that started and ended (``shared``: seen from a worker process)."""

    def __init__(self, shared: Any) -> None:
        self.gate = shared.Event()
        self.started = shared.Semaphore(0)
        self.ended = shared.Semaphore(0)
        self.started_items = shared.list()
        self.finished_items = shared.list()

    async def __call__(self, n: int) -> int:
        self.started_items.append(n)
        self.started.release()
        try:
            # Polled, not waited for in a thread: a cancellation must reach the task.
            while not self.gate.is_set():
                await anyio.sleep(0.005)
            self.finished_items.append(n)
        finally:
            self.ended.release()
        return n

    def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert self.started.acquire(timeout=10), "a task never started"

    def wait_ended(self, count: int) -> None:
        for _ in range(count):
            assert self.ended.acquire(timeout=10), "a task never ended"


def assert_workers_ended(workers: Iterable[Any], host: str) -> None:
    """Every worker's loop has ended: its thread, or its link thread and its process."""
    for worker in workers:
        worker._exited.result(timeout=10)
        worker._host_loop.join()  # past its last step: no real wait
        assert not worker._host_loop.is_alive()
        if host == "process":
            with pytest.raises(ProcessLookupError):  # ended, and reaped
                os.kill(worker.pid, 0)


def test_shutdown_wait_waits_for_every_task(
    make_pool: MakePool, shared: Any, pool_host: str
) -> None:
    pool = make_pool(2)
    gate = shared.Event()
    done = shared.list()

    async def task(n: int) -> None:
        await anyio.to_thread.run_sync(gate.wait, 10)
        done.append(n)

    futures = [pool.submit(task, n) for n in range(6)]
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    stopper.join(timeout=0.1)
    assert stopper.is_alive(), "shutdown(wait=True) returned while tasks were still waiting"
    assert list(done) == []
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert sorted(done) == list(range(6))
    assert all(f.done() and not f.cancelled() for f in futures)
    assert_workers_ended(pool.workers, pool_host)


def test_shutdown_cancel_futures_is_prompt(make_pool: MakePool, shared: Any) -> None:
    pool = make_pool(2)
    entered = shared.Semaphore(0)
    cleanups = shared.list()

    async def sleeper(n: int) -> None:
        try:
            entered.release()
            await anyio.sleep(3600)
        finally:
            cleanups.append(n)

    futures = [pool.submit(sleeper, n) for n in range(4)]
    for _ in futures:
        assert entered.acquire(timeout=10)
    begin = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - begin < 1.0
    assert all(f.cancelled() for f in futures)
    assert sorted(cleanups) == [0, 1, 2, 3]


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no-wait"])
@pytest.mark.parametrize("cancel_futures", [True, False], ids=["cancel", "no-cancel"])
def test_shutdown_wait_and_cancel_futures(
    make_pool: MakePool, shared: Any, pool_host: str, wait: bool, cancel_futures: bool
) -> None:
    # One task runs (max_concurrency=1); two wait their turn, in the parent on the
    # process host, in the worker's inbox on the thread host.
    pool = make_pool(1, max_concurrency=1)
    gated = Gated(shared)
    futures = [pool.submit(gated, n) for n in range(3)]
    gated.wait_started(1)
    stopper = threading.Thread(
        target=pool.shutdown, args=(wait,), kwargs={"cancel_futures": cancel_futures}
    )
    stopper.start()
    if wait and not cancel_futures:
        stopper.join(timeout=0.1)
        assert stopper.is_alive(), "shutdown(wait=True) returned while a task was running"
    else:
        stopper.join(10)  # neither waits for the gate
        assert not stopper.is_alive()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(gated, 3)
    if cancel_futures:
        # Without wait, the loop side cancels what it has taken (the running task, and
        # those held back by max_concurrency) once the stop reaches it.
        assert not concurrent.futures.wait(futures, timeout=10).not_done
        assert all(future.cancelled() for future in futures)
        if wait:
            # shutdown(wait=True) waited for the running task's clean-up.
            assert gated.ended.acquire(timeout=0)
        else:
            gated.wait_ended(1)
        gated.gate.set()
        pool.shutdown(wait=True)
        assert list(gated.started_items) == [0]  # the queued ones never started
        assert list(gated.finished_items) == []
    else:
        assert not any(future.done() for future in futures)
        gated.gate.set()
        assert [future.result(timeout=10) for future in futures] == [0, 1, 2]
        stopper.join(10)
        pool.shutdown(wait=True)
        assert list(gated.finished_items) == [0, 1, 2]
    assert_workers_ended(pool.workers, pool_host)


def test_submit_after_shutdown_raises(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(lambda: None)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.workers[0].submit(lambda: None)


@pytest.mark.parametrize("cancel_futures", [False, True], ids=["no-cancel", "cancel"])
def test_shutdown_twice_and_from_many_threads(
    make_pool: MakePool, shared: Any, pool_host: str, cancel_futures: bool
) -> None:
    pool = make_pool(2)
    gated = Gated(shared)
    futures = [pool.submit(gated, n) for n in range(2)]
    gated.wait_started(2)
    # Several threads at once: some wait, some do not, one cancels (or none does).
    calls = [(True, False), (True, False), (False, False), (True, cancel_futures)]
    threads = [
        threading.Thread(target=pool.shutdown, args=(wait,), kwargs={"cancel_futures": cancel})
        for wait, cancel in calls
    ]
    for thread in threads:
        thread.start()
    if not cancel_futures:
        threads[2].join(10)  # shutdown(wait=False) returns at once
        assert not threads[2].is_alive()
        assert not any(future.done() for future in futures)
        gated.gate.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    pool.shutdown()
    pool.shutdown(wait=False, cancel_futures=True)
    if cancel_futures:
        assert all(future.cancelled() for future in futures)
    else:
        assert [future.result(timeout=0) for future in futures] == [0, 1]
    gated.gate.set()
    assert_workers_ended(pool.workers, pool_host)


async def slow_value(n: int) -> int:
    await anyio.sleep(0.05)
    return n


def test_with_block_waits_on_normal_exit(backend_kwargs: dict[str, Any]) -> None:
    with PortalPool(2, **backend_kwargs) as pool:
        futures = [pool.submit(slow_value, n) for n in range(4)]
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_with_block_exception_cancels_and_reraises(
    backend_kwargs: dict[str, Any], shared: Any, pool_host: str, error: type[BaseException]
) -> None:
    gated = Gated(shared)
    with pytest.raises(error), PortalPool(2, **backend_kwargs) as pool:
        future = pool.submit(gated, 0)
        gated.wait_started(1)
        raise error
    assert future.cancelled()
    assert gated.ended.acquire(timeout=0), "the with block did not wait for the clean-up"
    assert list(gated.finished_items) == []
    assert_workers_ended(pool.workers, pool_host)


@pytest.mark.anyio
async def test_async_with_waits_on_normal_exit(
    backend_kwargs: dict[str, Any], pool_host: str
) -> None:
    async with PortalPool(2, **backend_kwargs) as pool:
        futures = [pool.submit(slow_value, n) for n in range(4)]
        assert await pool.run_async(slow_value, 9) == 9
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]
    assert_workers_ended(pool.workers, pool_host)


@pytest.mark.anyio
async def test_async_with_exception_cancels_and_reraises(
    backend_kwargs: dict[str, Any], shared: Any, pool_host: str
) -> None:
    gated = Gated(shared)
    with pytest.raises(LookupError):
        async with PortalPool(2, **backend_kwargs) as pool:
            future = pool.submit(gated, 0)
            await anyio.to_thread.run_sync(gated.wait_started, 1)
            raise LookupError
    assert future.cancelled()
    assert gated.ended.acquire(timeout=0), "async with did not wait for the clean-up"
    assert list(gated.finished_items) == []
    assert_workers_ended(pool.workers, pool_host)


def test_blocking_calls_inside_own_loop_raise_thread_host(pool_backend: str) -> None:
    """Thread host only: the task uses the pool object itself, which a task in a worker
    process cannot have (see the next test)."""
    backend, options, _ = POOL_BACKENDS[pool_backend]
    pool: PortalPool[Any] = PortalPool(2, backend=backend, backend_options=options, host="thread")

    async def misuse() -> list[str]:
        errors = []
        for call in (
            lambda: pool.run(anyio.sleep, 0),
            lambda: pool.shutdown(wait=True),
            lambda: pool.workers[0].run(anyio.sleep, 0),
        ):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))
        return errors

    try:
        errors = pool.workers[0].run(misuse)
        assert len(errors) == 3
        assert all("would deadlock" in message for message in errors)
        # Waiting on a future of one's own worker is refused too.

        async def wait_own() -> str:
            inner = pool.workers[1].submit(anyio.sleep, 0)
            try:
                inner.result()
            except RuntimeError as exc:
                return str(exc)
            return "no error"

        assert "would deadlock" in pool.workers[1].run(wait_own)
    finally:
        pool.shutdown()


async def misuse_own_worker() -> list[str]:
    """Block on the calling task's own worker, in each way there is; the errors."""
    worker = current_worker()
    errors = []
    for call in (
        lambda: worker.run(anyio.sleep, 0),
        lambda: worker.submit(anyio.sleep, 0).result(),
    ):
        try:
            call()
        except RuntimeError as exc:
            errors.append(str(exc))
    return errors


def test_blocking_calls_on_a_workers_own_loop_raise(make_pool: MakePool, pool_host: str) -> None:
    pool = make_pool(2)
    for worker in pool.workers:
        errors = worker.run(misuse_own_worker)
        assert len(errors) == 2
        assert all(f"inside worker {worker.index}'s own event loop" in e for e in errors)
        assert all("would deadlock" in e for e in errors)
    if pool_host != "thread":
        # A task that would take the pool with it to its process is refused at submit.
        with pytest.raises(TypeError, match="a PortalPool cannot be sent to a worker"):
            pool.submit(lambda: pool.run(anyio.sleep, 0))


def _in_foreign_loop(loop_backend: str, body: Callable[[], None]) -> None:
    """Run ``body`` synchronously inside a running asyncio or trio loop."""

    async def host() -> None:
        body()

    if loop_backend == "asyncio":
        asyncio.run(host())
    else:
        import trio

        trio.run(host)


async def double(n: int) -> int:
    return n * 2


@pytest.mark.parametrize("loop_backend", ["asyncio", pytest.param("trio", marks=requires_trio)])
def test_submit_and_shutdown_from_a_thread_running_a_loop(
    backend_kwargs: dict[str, Any], loop_backend: str
) -> None:
    results: list[int] = []

    def body() -> None:
        pool = PortalPool(2, **backend_kwargs)
        futures = [pool.submit(double, n) for n in range(10)]
        with pool:  # the sync exit, from inside a foreign loop
            pass
        results.extend(f.result(timeout=0) for f in futures)

    _in_foreign_loop(loop_backend, body)
    assert results == [n * 2 for n in range(10)]


def test_pool_dropped_without_shutdown_stops_its_workers(
    backend_kwargs: dict[str, Any], pool_host: str
) -> None:
    pool = PortalPool(2, **backend_kwargs)
    future: Future[Any] = pool.submit(slow_value, 1)
    workers = pool.workers  # a worker holds no reference to its pool
    del pool
    gc.collect()
    assert_workers_ended(workers, pool_host)
    assert future.result(timeout=0) == 1


# Submits work and ends without shutdown(); prints the workers' pids first.
SCRIPT_WITHOUT_SHUTDOWN = """
import os, sys, anyio
from portal_pool import PortalPool

async def work(directory, n):
    await anyio.sleep(0.2)  # still running when the script's last line has run
    with open(os.path.join(directory, str(n)), "w") as marker:
        marker.write(str(os.getpid()))

pool = PortalPool(2, backend=sys.argv[1], backend_options=eval(sys.argv[2]), host=sys.argv[3])
print(*(worker.pid for worker in pool.workers), flush=True)
for n in range(6):
    pool.submit(work, sys.argv[4], n)
print("submitted", flush=True)
"""


# On Ray, the script would start a Ray runtime of its own: test_ray_host's cluster script
# ends with a pool left open instead.
@pytest.mark.hosts("thread", "process")
def test_a_script_ending_without_shutdown_finishes_its_work(
    backend_kwargs: dict[str, Any], pool_host: str, tmp_path: Path
) -> None:
    argv = [backend_kwargs["backend"], repr(backend_kwargs["backend_options"]), pool_host]
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT_WITHOUT_SHUTDOWN), *argv, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    pids_line, submitted = completed.stdout.splitlines()
    assert submitted == "submitted"
    pids = {int(pid) for pid in pids_line.split()}
    # Every task ran to its end, in a worker's process.
    assert sorted(marker.name for marker in tmp_path.iterdir()) == [str(n) for n in range(6)]
    assert {int(marker.read_text()) for marker in tmp_path.iterdir()} <= pids
    if pool_host == "thread":
        assert len(pids) == 1  # the script's own
        return
    assert len(pids) == 2
    deadline = time.monotonic() + 2
    for pid in pids:  # no child remains
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"worker process {pid} outlived the script"
            time.sleep(0.01)
