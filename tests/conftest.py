"""Shared fixtures: backend and host parametrization, and the thread and process leak
checks.

A test module opts in to the process and Ray hosts with
``HOSTS = ("thread", "process", "ray")``; the others run on the thread host only (see
``default_hosts`` for Ray). ``--host`` narrows the choice, as ``--backend`` does, and a
test about one host's own machinery says which with ``@pytest.mark.hosts(...)``.
``module_pool`` is a pool that a module's tests share, per backend and host.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from portal_pool import PortalPool
from portal_pool.ray import RayHost

from . import ray_support

# name -> (backend, backend_options, module that must be importable)
POOL_BACKENDS: dict[str, tuple[str, dict[str, Any], str]] = {
    "asyncio": ("asyncio", {}, "asyncio"),
    "uvloop": ("asyncio", {"use_uvloop": True}, "uvloop"),
    "trio": ("trio", {}, "trio"),
}


HOSTS = ("thread", "process", "ray")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        choices=sorted(POOL_BACKENDS),
        help="pool backend(s) to test; default: every installed one",
    )
    parser.addoption(
        "--host",
        action="append",
        choices=HOSTS,
        help="pool host(s) to test, in the modules that run on several; default: all",
    )


def _selected(config: pytest.Config) -> list[str]:
    chosen = config.getoption("--backend") or list(POOL_BACKENDS)
    return [name for name in chosen if _installed(POOL_BACKENDS[name][2])]


# Set by nox and .ci/run for their free-threaded runs (PYTHON_GIL=0): a run that was meant to
# test without the GIL and did not (the variable lost on the way, or not a free-threaded
# build) must fail, not pass as if it had.
REQUIRE_NO_GIL = "PORTAL_POOL_REQUIRE_NO_GIL"


def gil_enabled() -> bool:
    """Whether the GIL is on in this process (always, before Python 3.13)."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def _check_no_gil(when: str) -> str | None:
    """Why the run must fail, if it requires the GIL off and it is on; else ``None``."""
    if os.environ.get(REQUIRE_NO_GIL) != "1" or not gil_enabled():
        return None
    return (
        f"{REQUIRE_NO_GIL}=1 but the GIL is enabled {when} (Python {sys.version}): run a "
        "free-threaded build with PYTHON_GIL=0"
    )


def pytest_configure(config: pytest.Config) -> None:
    # The package and the backends it runs, imported now: the check covers them.
    for module in ("portal_pool", "anyio", "trio"):
        if _installed(module):
            importlib.import_module(module)
    failure = _check_no_gil("after importing portal_pool, anyio and trio")
    if failure is not None:
        raise pytest.UsageError(failure)
    config.addinivalue_line(
        "markers",
        "hosts(*names): run the test on these hosts only, of its module's HOSTS (for a "
        "test about one host's own machinery, such as the thread host's portal)",
    )
    config.addinivalue_line(
        "markers", "ray: a test on the Ray host (one local Ray runtime per session)"
    )
    # Tasks on the process and Ray hosts reach the `shared` manager's objects: their
    # processes must hold its key (see ray_support.share_authkey).
    multiprocessing.current_process().authkey = ray_support.AUTHKEY
    # The Ctrl-C tests need a SIGINT that works, in this process (a signal sent to its
    # main thread) and in the scripts it starts. A run started with SIGINT ignored (in
    # the background, by some CI launchers) would pass that on: handle it as a program
    # started from a terminal does.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Again at the end, after everything the tests imported.
    failure = _check_no_gil("at the end of the run")
    if failure is not None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "free-threading check", red=True)
            reporter.write_line(f"ERROR: {failure}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pool_backend" in metafunc.fixturenames:
        # Module-scoped, so that a module-scoped fixture (module_pool) can depend on it.
        metafunc.parametrize("pool_backend", _selected(metafunc.config), scope="module")
    if "pool_host" in metafunc.fixturenames:
        module_hosts = getattr(metafunc.module, "HOSTS", ("thread",))
        chosen = metafunc.config.getoption("--host") or default_hosts(module_hosts)
        hosts = [host for host in module_hosts if host in chosen]
        marker = metafunc.definition.get_closest_marker("hosts")
        if marker is not None:  # a test about one host's own machinery
            hosts = [host for host in hosts if host in marker.args]
        params: list[Any] = [
            pytest.param(host, marks=ray_support.HOST_MARKS) if host == "ray" else host
            for host in hosts
        ]
        # None: on none of the chosen hosts, and deselected (pytest_collection_modifyitems)
        metafunc.parametrize("pool_host", params or [None], scope="module")


def default_hosts(module_hosts: tuple[str, ...]) -> tuple[str, ...]:
    """The hosts a module runs on when ``--host`` is not given.

    A shared module runs on Ray only when asked (``--host ray``, as ``nox -s ray`` does):
    each of its tests starts Ray actors, 2-5 s apiece on a busy 2-core machine, which
    would make the default run several times longer. A module of the Ray host's own
    always runs on it (skipped, saying why, without Ray).
    """
    if module_hosts == ("ray",):
        return module_hosts
    return tuple(host for host in module_hosts if host != "ray")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Honour ``--backend`` for the unittest classes built per backend (they have no
    fixtures to parametrize; see test_stdlib_executor.py), and drop a test whose
    ``hosts`` marker leaves it no host that ``--host`` selected."""
    selected = _selected(config)
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        backend = getattr(getattr(item, "cls", None), "pool_backend", None)
        hosts = item.get_closest_marker("hosts")
        callspec = getattr(item, "callspec", None)
        wanted = backend is None or backend in selected
        if callspec is not None and "pool_host" in callspec.params:
            host = callspec.params["pool_host"]
            wanted = wanted and host is not None and (hosts is None or host in hosts.args)
        (keep if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=[name for name in ("asyncio", "trio") if _installed(name)])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The caller's loop, independent of the pool's: every pairing is exercised."""
    return str(request.param)


@pytest.fixture(scope="module")
def backend_kwargs(
    pool_backend: str, pool_host: str, request: pytest.FixtureRequest
) -> dict[str, Any]:
    backend, options, _ = POOL_BACKENDS[pool_backend]
    return {"backend": backend, "backend_options": options, "host": host_for(pool_host, request)}


def host_for(pool_host: str, request: pytest.FixtureRequest) -> Any:
    """What to pass as ``PortalPool(host=...)`` for the ``pool_host`` parameter."""
    if pool_host != "ray":
        return pool_host
    request.getfixturevalue("ray_runtime")
    # No CPUs reserved: the tests' pools would otherwise queue for the runtime's two.
    return RayHost(num_cpus=0)


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[Any]:
    """The local Ray runtime that every Ray test shares, started once per session."""
    yield from ray_support.local_runtime()


class ThreadShared:
    """Objects that a test and its tasks share, on the thread host: the ordinary ones.

    Has the same factories as a ``multiprocessing`` manager, whose proxies a test uses
    on the process host instead (see ``shared``).
    """

    Event = staticmethod(threading.Event)
    Lock = staticmethod(threading.Lock)
    Semaphore = staticmethod(threading.Semaphore)
    list = staticmethod(list)
    dict = staticmethod(dict)


@pytest.fixture(scope="session")
def _manager() -> Iterator[Any]:
    manager = multiprocessing.get_context("spawn").Manager()
    yield manager
    manager.shutdown()


@pytest.fixture
def shared(pool_host: str, request: pytest.FixtureRequest) -> Any:
    """Events, locks, lists and dicts that tasks share with the test, on every host.

    On the process and Ray hosts they are proxies to a manager process: a task in a
    worker process or actor that sets an event, or appends to a list, is seen by the test.
    """
    if pool_host == "thread":
        return ThreadShared
    return request.getfixturevalue("_manager")


@pytest.fixture
def make_pool(backend_kwargs: dict[str, Any]) -> Iterator[Callable[..., PortalPool[Any]]]:
    """Build pools on the test's backend; any left running are cancelled at teardown."""
    pools: list[PortalPool[Any]] = []

    def factory(max_workers: int | None = 2, **kwargs: Any) -> PortalPool[Any]:
        pool: PortalPool[Any] = PortalPool(max_workers, **backend_kwargs, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def _module_pool(backend_kwargs: dict[str, Any]) -> Iterator[PortalPool[Any]]:
    pool: PortalPool[Any] = PortalPool(2, **backend_kwargs)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)
    alive = [worker.index for worker in pool.workers if worker._host_loop.is_alive()]
    assert not alive, f"workers {alive} of the module's pool outlived its shutdown"


@pytest.fixture
def module_pool(_module_pool: PortalPool[Any]) -> Iterator[PortalPool[Any]]:
    """A two-worker pool that a module's tests share, per backend and host: for a test
    that needs no pool of its own (starting a worker process costs ~0.1-0.2 s).

    A test must leave it idle (nothing running or queued), as it found it: checked here.
    """
    yield _module_pool
    deadline = time.monotonic() + 10
    while (pending := _module_pool.stats().pending) and time.monotonic() < deadline:
        time.sleep(0.005)  # a cancelled task's clean-up may still be ending
    assert pending == 0, f"the test left {pending} task(s) unfinished in the module's pool"


# The prefix of the kept pools' threads and processes: the leak checks let them outlive a
# test, as they are meant to.
KEPT_POOL_PREFIX = "kept-pool"


@pytest.fixture(scope="module")
def _kept_pools() -> Iterator[dict[tuple[Any, ...], PortalPool[Any]]]:
    pools: dict[tuple[Any, ...], PortalPool[Any]] = {}
    yield pools
    for pool in pools.values():
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def kept_pool(
    backend_kwargs: dict[str, Any], _kept_pools: dict[tuple[Any, ...], PortalPool[Any]]
) -> Callable[[int], PortalPool[Any]]:
    """A pool that lasts for the rest of the module, one per backend, host and size.

    For tests that only run work and check its results, not a pool's counters or
    settings: on the process host, starting a pool per test is what costs the time.
    A test must leave nothing running on it.
    """

    def get(max_workers: int = 2) -> PortalPool[Any]:
        key = (*map(repr, sorted(backend_kwargs.items())), max_workers)
        pool = _kept_pools.get(key)
        if pool is None:
            pool = PortalPool(max_workers, thread_name_prefix=KEPT_POOL_PREFIX, **backend_kwargs)
            _kept_pools[key] = pool
        return pool

    return get


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail any test that leaves a thread running after it ends."""
    before = set(threading.enumerate())
    yield
    # trio keeps a global cache of idle threads for to_thread; they are trio's, reused
    # across runs, and exit on their own after an idle timeout.
    leaked = [
        thread
        for thread in threading.enumerate()
        if thread not in before and not thread.name.startswith(("Trio thread", KEPT_POOL_PREFIX))
    ]
    for thread in leaked:
        thread.join(timeout=5)  # a clean exit in progress gets a bounded grace period
    alive = [thread.name for thread in leaked if thread.is_alive()]
    assert not alive, f"threads leaked by this test: {alive}"


@pytest.fixture(autouse=True)
def no_leaked_actors() -> Iterator[None]:
    """Fail any test that leaves one of its pools' Ray actors alive (none without Ray)."""
    before = ray_support.live_pool_actors()
    yield
    leaked = ray_support.live_pool_actors() - before
    assert not leaked, f"Ray actors leaked by this test: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def no_leaked_worker_processes() -> Iterator[None]:
    """Fail any test that leaves a worker process alive after it ends (those of a pool
    that outlives the test, such as ``module_pool``, existed before it)."""
    before = set(multiprocessing.active_children())
    yield
    # Worker processes are named after their pool's thread_name_prefix: those of the
    # kept pools (see kept_pool) do not match.
    leaked = [
        child
        for child in multiprocessing.active_children()
        if child.name.startswith("portal_pool") and child not in before
    ]
    for child in leaked:
        child.join(timeout=5)  # a clean exit in progress gets a bounded grace period
    alive = [f"{child.name} (pid {child.pid})" for child in leaked if child.is_alive()]
    for child in leaked:
        child.kill()  # not to fail every later test too
    assert not alive, f"worker processes leaked by this test: {alive}"


requires_trio = pytest.mark.skipif(not _installed("trio"), reason="trio is not installed")
