"""The Ray host's own promises. What every host promises (maps, limits, statistics,
cancellation, bad input, worker_context, shutdown) runs on Ray in the host-parametrized
modules; this module has what only Ray has: nodes, actors that Ray kills and restarts,
cancellations that cross in a concurrency group of their own, and clusters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from portal_pool import BrokenPortalPool, PortalPool, current_worker
from portal_pool._pickling import encode_call
from portal_pool._process_child import child_config
from portal_pool._ray_actor import WorkerActor

from . import ray_support
from .conftest import POOL_BACKENDS

HOSTS = ("ray",)

needs_ray = pytest.mark.skipif(not ray_support.RAY_INSTALLED, reason=ray_support.NO_RAY)

MakePool = Callable[..., PortalPool[Any]]


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def node_of_this_task() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


# -- without a Ray runtime ---------------------------------------------------------------


def test_without_ray_the_host_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from portal_pool.ray import RayHost

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"^RayHost needs Ray.*install portal_pool\[ray\]$"):
        RayHost()
    with pytest.raises(ImportError, match=r"install portal_pool\[ray\]"):
        PortalPool(1, host="ray")


def test_importing_portal_pool_ray_does_not_import_ray() -> None:
    code = "import sys, portal_pool.ray; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@needs_ray
def test_bad_arguments_are_refused_saying_what_is_allowed() -> None:
    from portal_pool.ray import RayHost

    with pytest.raises(ValueError, match=r"^num_cpus must be a number >= 0, got -1$"):
        RayHost(num_cpus=-1)
    for bad in (-2, 1.5):
        with pytest.raises(ValueError, match=r"^max_restarts must be an integer >= -1"):
            RayHost(max_restarts=bad)  # type: ignore[arg-type]
    assert "max_restarts=3" in repr(RayHost(max_restarts=3))


RAN_HERE: list[int] = []


def ran_here(value: int) -> None:
    RAN_HERE.append(value)  # pickled by reference: the call reaches this very list


def test_the_actor_keeps_a_cancellation_that_comes_before_its_call() -> None:
    # Ray does not order the control group (cancel) with the calls: a cancellation may
    # overtake its call. The actor class is plain Python: drive it in a loop of our own.
    async def scenario() -> tuple[Any, ...]:
        from portal_pool._host import LoopSettings

        settings = LoopSettings("asyncio", {}, None, "ray-test", None, None, None)
        actor = WorkerActor(child_config(0, settings), forward_logs=False)
        try:
            assert (await actor.ready())[0] == "ready"
            ran = RAN_HERE
            ran.clear()
            blob = encode_call(ran_here, (1,), {})
            await actor.cancel([5, 6], settled_below=0)  # before calls 5 and 6 come
            cancelled = await actor.call(5, blob)
            # Settled in the pool: 6 will not come, so its early cancellation goes.
            await actor.cancel([], settled_below=7)
            kept = set(actor._early_cancels)
            answered = await actor.call(7, blob)
            return cancelled, kept, answered, ran
        finally:
            await actor.stop(True)

    cancelled, kept, answered, ran = asyncio.run(scenario())
    assert cancelled[1] is None  # answered as cancelled, never run
    assert kept == set()  # 5 was used, 6 pruned
    assert answered[1] is not None
    assert ran == [1]  # only call 7 ran


# -- on the session's local Ray runtime --------------------------------------------------


def test_workers_know_their_actor_process_and_node(
    module_pool: PortalPool[Any], ray_runtime: Any
) -> None:
    node = ray_runtime.get_runtime_context().get_node_id()
    for worker in module_pool.workers:
        assert worker.node == node
        assert worker.run(os.getpid) == worker.pid != os.getpid()
        assert worker.run(node_of_this_task) == node


def test_node_is_none_on_one_machine_hosts() -> None:
    with PortalPool(1) as pool:
        assert pool.workers[0].node is None


def test_default_max_workers_is_the_clusters_cpu_count(
    backend_kwargs: dict[str, Any], ray_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not this machine's: the cluster's.
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 7, raising=False)
    with PortalPool(**backend_kwargs) as pool:
        assert len(pool.workers) == int(ray_runtime.cluster_resources()["CPU"]) == 2


async def sleep_then_record(index: int, started: Any, finished: Any) -> None:
    started.append(index)
    await anyio.sleep(30)  # only a lost cancellation lets it get past this
    finished.append(index)


@pytest.mark.parametrize("when", ["at_once", "once_sent"])
def test_cancellation_never_lies(make_pool: MakePool, shared: Any, when: str) -> None:
    # Ray's own ray.cancel() right after .remote() let 6 of 20 such calls run to their end
    # while reporting them cancelled. Here: 50 calls, each cancelled right after submit
    # (most never leave this process) or right after it is sent (the cancellation races
    # the call to the actor, in another concurrency group).
    pool = make_pool(2)
    started, finished = shared.list(), shared.list()
    futures = []
    for index in range(50):
        future = pool.submit(sleep_then_record, index, started, finished)
        if when == "once_sent":
            wait_until(future.running)
        assert future.cancel()
        futures.append(future)
    pool.shutdown(wait=True)  # waits for every call's end in its actor
    assert all(future.cancelled() for future in futures)
    assert list(finished) == []
    assert pool.stats().cancelled == 50


async def hold_until(index: int, started: Any, release: Any) -> int:
    started.release()
    while not release.is_set():
        await anyio.sleep(0.005)
    return index


async def pid_once_set(release: Any) -> int:
    while not release.is_set():
        await anyio.sleep(0.005)
    return os.getpid()


def test_a_killed_actor_fails_its_calls_and_runs_the_rest_once_back(
    backend_kwargs: dict[str, Any], shared: Any, caplog: pytest.LogCaptureFixture
) -> None:
    entries = shared.list()

    @asynccontextmanager
    async def counted() -> AsyncIterator[int]:
        entries.append(os.getpid())
        yield os.getpid()

    started, release, gate = shared.Semaphore(0), shared.Event(), shared.Event()
    caplog.set_level(logging.WARNING, logger="portal_pool")
    with PortalPool(1, max_concurrency=2, worker_context=counted, **backend_kwargs) as pool:
        first = pool.workers[0].pid
        doomed = [pool.submit(hold_until, i, started, release) for i in range(2)]
        for _ in doomed:
            assert started.acquire(timeout=10)
        # Held back by the credit window: never sent to the actor that dies.
        waiting = [pool.submit(pid_once_set, gate) for _ in range(3)]
        assert (pool.stats().running, pool.stats().queued) == (2, 3)
        os.kill(first, signal.SIGKILL)
        for future in doomed:
            with pytest.raises(BrokenPortalPool, match=r"may or may not have run"):
                future.result(timeout=30)
        gate.set()
        pids = [future.result(timeout=30) for future in waiting]
        second = pool.workers[0].pid
        assert pids == [second] * 3
        assert second != first
        assert pool.run(lambda: current_worker().context) == second
        stats = pool.stats()
    assert list(entries) == [first, second]  # worker_context entered again
    assert (stats.restarts, stats.failed, stats.completed) == (1, 2, 4)
    assert any("Ray restarted it" in message for message in caplog.messages)


def test_with_no_restarts_left_the_worker_is_broken_and_says_so(
    pool_backend: str, ray_runtime: Any, shared: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from portal_pool.ray import RayHost

    backend, options, _ = POOL_BACKENDS[pool_backend]
    started, release = shared.Semaphore(0), shared.Event()
    caplog.set_level(logging.ERROR, logger="portal_pool")
    host = RayHost(num_cpus=0, max_restarts=0)
    with PortalPool(1, backend=backend, backend_options=options, host=host) as pool:
        worker = pool.workers[0]
        doomed = pool.submit(hold_until, 0, started, release)
        assert started.acquire(timeout=10)
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(BrokenPortalPool):
            doomed.result(timeout=30)
        worker._exited.result(timeout=30)  # the feeder gave up
        # Later work is refused, saying why.
        with pytest.raises(
            BrokenPortalPool, match=r"event loop has stopped: its actor died .*max_restarts=0"
        ):
            pool.submit(os.getpid)
    assert any(
        "the worker is broken" in message and "max_restarts=0" in message
        for message in caplog.messages
    )


def test_no_actor_of_the_pool_outlives_shutdown(
    backend_kwargs: dict[str, Any], ray_runtime: Any
) -> None:
    from ray.util import list_named_actors

    before = set(list_named_actors())
    pool = PortalPool(2, **backend_kwargs)
    names = set(list_named_actors()) - before
    ids = [worker._host_loop._actor._actor_id.hex() for worker in pool.workers]  # type: ignore[attr-defined]
    assert len(names) == 2
    assert all(name.startswith("portal_pool-") for name in names)
    pool.shutdown(wait=True)
    assert names.isdisjoint(list_named_actors())
    # The state API reads Ray's control store (the GCS): no dashboard needed.
    states = [ray_support.actor_state(actor_id) for actor_id in ids]
    assert states == ["DEAD", "DEAD"]


def test_a_done_callback_that_waits_for_its_worker_is_refused_not_hung(
    module_pool: PortalPool[Any], shared: Any
) -> None:
    worker = module_pool.workers[0]
    started, release = shared.Semaphore(0), shared.Event()
    outcomes: list[str] = []

    def waits_for_the_same_worker(_: Any) -> None:
        # Runs in the worker's feeder thread, which settles the worker's futures: the
        # wait would never end.
        try:
            worker.submit(os.getpid).result(timeout=10)
            outcomes.append("returned")
        except RuntimeError as exc:
            outcomes.append(str(exc))

    future = worker.submit(hold_until, 0, started, release)
    assert started.acquire(timeout=10)
    future.add_done_callback(waits_for_the_same_worker)  # not done: runs when settled
    release.set()
    assert future.result(timeout=10) == 0
    wait_until(lambda: bool(outcomes))
    assert "would deadlock" in outcomes[0]


TWO_NODES = textwrap.dedent(
    """
    import anyio, atexit, json, sys
    import ray
    from ray.cluster_utils import Cluster
    from portal_pool import PortalPool
    from portal_pool.ray import RayHost

    def node_of_this_task():
        return ray.get_runtime_context().get_node_id()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    # Last, after the pool's own exit hook (see the end).
    atexit.register(cluster.shutdown)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    found = {}
    for backend in sys.argv[1:]:
        host = RayHost(num_cpus=1, scheduling_strategy="SPREAD")
        with PortalPool(2, backend=backend, host=host) as pool:
            nodes = [worker.node for worker in pool.workers]
            ran = [worker.run(node_of_this_task) for worker in pool.workers]
            mapped = sorted(set(pool.map(node_of_this_task_of, range(8))))
        found[backend] = {"nodes": nodes, "ran": ran, "mapped": mapped}
    print(json.dumps({"found": found, "cluster": sorted(n["NodeID"] for n in ray.nodes())}))
    # A pool left open, with a call running: the interpreter's exit lets it finish, as
    # ThreadPoolExecutor does, then ends the actor, and does not hang.
    pool = PortalPool(1, backend=sys.argv[1], host=RayHost(num_cpus=1))
    sleeper = pool.submit(anyio.sleep, 0.5)
    sleeper.add_done_callback(lambda f: print("left open:", f.result(), flush=True))
    while not sleeper.running():
        pass
    """
).replace("node_of_this_task_of", "lambda _: node_of_this_task()")


@needs_ray
@pytest.mark.ray
@pytest.mark.timeout(180)
def test_spread_places_workers_on_both_nodes_of_a_cluster(tmp_path: Any) -> None:
    # A cluster of its own, in a process of its own: this one is connected to the
    # session's runtime, and a process joins one Ray cluster at a time. The script ends
    # with a pool left open and a call running in it: it must still exit.
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    backends = [name for name in ("asyncio", "trio") if ray_support.installed(name)]
    result = subprocess.run(
        [sys.executable, str(script), *backends],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *_, line, left_open = result.stdout.strip().splitlines()
    assert left_open == "left open: None"
    report = json.loads(line)
    cluster = report["cluster"]
    assert len(cluster) == 2
    for backend in backends:
        found = report["found"][backend]
        assert sorted(found["nodes"]) == cluster  # one worker on each node
        assert found["ran"] == found["nodes"]  # and each ran work where it said
        assert found["mapped"] == cluster  # map used both
