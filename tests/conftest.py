"""Shared fixtures: backend and host parametrization, and the thread and process leak
checks.

A test module opts in to the process host with ``HOSTS = ("thread", "process")``; the
others run on the thread host only. ``--host`` narrows the choice, as ``--backend`` does.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from portal_pool import PortalPool

# name -> (backend, backend_options, module that must be importable)
POOL_BACKENDS: dict[str, tuple[str, dict[str, Any], str]] = {
    "asyncio": ("asyncio", {}, "asyncio"),
    "uvloop": ("asyncio", {"use_uvloop": True}, "uvloop"),
    "trio": ("trio", {}, "trio"),
}


HOSTS = ("thread", "process")


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pool_backend" in metafunc.fixturenames:
        metafunc.parametrize("pool_backend", _selected(metafunc.config))
    if "pool_host" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--host") or HOSTS
        hosts = [host for host in getattr(metafunc.module, "HOSTS", ("thread",)) if host in chosen]
        metafunc.parametrize("pool_host", hosts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Honour ``--backend`` for the unittest classes built per backend (they have no
    fixtures to parametrize; see test_stdlib_executor.py)."""
    selected = _selected(config)
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        backend = getattr(getattr(item, "cls", None), "pool_backend", None)
        (keep if backend is None or backend in selected else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=[name for name in ("asyncio", "trio") if _installed(name)])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The caller's loop, independent of the pool's: every pairing is exercised."""
    return str(request.param)


@pytest.fixture
def backend_kwargs(pool_backend: str, pool_host: str) -> dict[str, Any]:
    backend, options, _ = POOL_BACKENDS[pool_backend]
    return {"backend": backend, "backend_options": options, "host": pool_host}


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
    """Events, locks, lists and dicts that tasks share with the test, on either host.

    On the process host they are proxies to a manager process: a task in a worker
    process that sets an event, or appends to a list, is seen by the test.
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
        if thread not in before and not thread.name.startswith("Trio thread")
    ]
    for thread in leaked:
        thread.join(timeout=5)  # a clean exit in progress gets a bounded grace period
    alive = [thread.name for thread in leaked if thread.is_alive()]
    assert not alive, f"threads leaked by this test: {alive}"


@pytest.fixture(autouse=True)
def no_leaked_worker_processes() -> Iterator[None]:
    """Fail any test that leaves a worker process alive after it ends.

    Those of a pool shared by several tests (a module-scoped fixture's, started before
    this check) are not the test's.
    """
    before = set(multiprocessing.active_children())
    yield
    leaked = [
        child
        for child in multiprocessing.active_children()
        if child not in before and child.name.startswith("portal_pool")
    ]
    for child in leaked:
        child.join(timeout=5)  # a clean exit in progress gets a bounded grace period
    alive = [f"{child.name} (pid {child.pid})" for child in leaked if child.is_alive()]
    for child in leaked:
        child.kill()  # not to fail every later test too
    assert not alive, f"worker processes leaked by this test: {alive}"


requires_trio = pytest.mark.skipif(not _installed("trio"), reason="trio is not installed")
