"""The public surface: exports, version, types."""

from __future__ import annotations

import inspect

import portal_pool


def test_all_matches_the_public_names() -> None:
    public = {
        name
        for name, value in vars(portal_pool).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(portal_pool.__all__) == public
    for name in portal_pool.__all__:
        assert getattr(portal_pool, name).__module__.startswith("portal_pool")


def test_portal_pool_ray_exports_the_ray_host_only() -> None:
    import portal_pool.ray

    public = {name for name in vars(portal_pool.ray) if not name.startswith("_")}
    assert portal_pool.ray.__all__ == ["RayHost"]
    assert public == {"RayHost"}
    assert portal_pool.ray.RayHost.__module__.startswith("portal_pool")


def test_version_comes_from_one_place() -> None:
    from importlib.metadata import version

    assert portal_pool.__version__ == version("portal_pool")


def test_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("portal_pool").joinpath("py.typed").is_file()


def test_task_future_sets_every_field_future_init_sets() -> None:
    # TaskFuture mirrors Future.__init__ field for field with a slimmer condition, and
    # the two lists as properties that make them on first use; a Python release that
    # adds a field there must fail here, not in production.
    from concurrent.futures import Future

    from portal_pool._future import TaskFuture

    base = set(vars(Future()))
    future = TaskFuture(None, print, (), {})  # type: ignore[arg-type]
    lazy = {name for name in base if isinstance(getattr(TaskFuture, name, None), property)}
    assert lazy == {"_waiters", "_done_callbacks"}
    assert base - lazy <= set(vars(future))
    assert future._waiters == []
    assert future._waiters is future._waiters
    assert future._done_callbacks == []
    assert future._done_callbacks is future._done_callbacks


def test_a_started_future_is_two_objects_for_the_garbage_collector() -> None:
    """The future and its lock, which is also its condition: with tens of thousands of
    calls waiting, every full collection walks each object a call keeps alive."""
    import gc

    from portal_pool._future import TaskFuture

    count = 1000
    gc.collect()
    before = len(gc.get_objects())
    futures = [TaskFuture(None, print, (), {}) for _ in range(count)]  # type: ignore[arg-type]
    for future in futures:
        assert future._begin() is not None  # started: the call tuple is dropped
    grown = len(gc.get_objects()) - before
    assert grown <= 2 * count + 10, f"{grown / count:.1f} objects per future"


def test_task_future_works_with_the_stdlib_helpers() -> None:
    import asyncio
    import threading
    from concurrent.futures import FIRST_COMPLETED, as_completed, wait

    from portal_pool import PortalPool

    with PortalPool(1) as pool:
        gate = threading.Event()
        slow = pool.submit(asyncio.to_thread, gate.wait, 10)
        fast = pool.submit(lambda: "fast")
        done, not_done = wait([slow, fast], timeout=10, return_when=FIRST_COMPLETED)
        assert fast in done
        assert slow in not_done
        gate.set()
        assert set(as_completed([slow, fast], timeout=10)) == {slow, fast}

        async def wrapped() -> str:
            return await asyncio.wrap_future(pool.submit(lambda: "wrapped"))

        assert asyncio.run(wrapped()) == "wrapped"
