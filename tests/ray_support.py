"""The Ray host's test support: one local Ray runtime per session, shared by every test.

Imports no Ray unless a Ray test runs; without Ray, those tests are skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import sys
from collections.abc import Iterator
from typing import Any

import pytest

RAY_INSTALLED = importlib.util.find_spec("ray") is not None

NO_RAY = "Ray is not installed: pip install 'portal_pool[ray]' to run the Ray host's tests"

# Marks for a test on the Ray host: selectable with -m ray, skipped without Ray.
HOST_MARKS = [pytest.mark.ray, pytest.mark.skipif(not RAY_INSTALLED, reason=NO_RAY)]

# The key of the `shared` fixture's manager, in the test process and every Ray worker
# (a manager's proxies are unpickled with the key of the process that unpickles them).
AUTHKEY = b"portal_pool tests"


def share_authkey() -> None:
    """Run by Ray in each of its worker processes as it starts (worker_process_setup_hook)."""
    multiprocessing.current_process().authkey = AUTHKEY


def local_runtime() -> Iterator[Any]:
    """Start the session's local Ray runtime; shut it down at the end."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    ray.init(
        # A runtime of its own, even where another one left its address behind (a
        # cluster test's, say), which ray.init() would otherwise join.
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": f"{__name__}.share_authkey"},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def actor_state(actor_id: str) -> str:
    """An actor's state in Ray's control store (the GCS), which needs no dashboard."""
    from ray._private import state

    return str(state.actors(actor_id)["State"])


def live_pool_actors() -> set[str]:
    """The names of the pools' actors that Ray knows alive, if this process uses Ray.

    Named after their pool's thread_name_prefix: those of the kept pools (see kept_pool
    in conftest), which outlive a test on purpose, do not match.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return set()
    return {name for name in ray.util.list_named_actors() if name.startswith("portal_pool")}
