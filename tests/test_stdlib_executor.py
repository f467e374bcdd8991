"""CPython's own ``concurrent.futures`` executor tests, run against PortalPool.

The stdlib's test package ``test.test_concurrent_futures`` (3.12 and later, when the
interpreter ships its tests) builds its test classes from mixins: a test mixin
(``ExecutorTest``, ``WaitTests``, ...) and an executor mixin that names the executor
type. Here the executor is a PortalPool on each pool backend. Tests that need the executor
itself in a subprocess (``from concurrent.futures import <executor type>``), or that test
``ThreadPoolExecutor``'s internals, are skipped with the reason.
"""

from __future__ import annotations

import unittest
from functools import partial
from typing import Any

import pytest

from portal_pool import PortalPool

from .conftest import POOL_BACKENDS, _installed

_STDLIB = "test.test_concurrent_futures"
_REASON = f"this interpreter does not ship the stdlib test package {_STDLIB}"
util: Any = pytest.importorskip(f"{_STDLIB}.util", reason=_REASON)
as_completed: Any = pytest.importorskip(f"{_STDLIB}.test_as_completed", reason=_REASON)
shutdown: Any = pytest.importorskip(f"{_STDLIB}.test_shutdown", reason=_REASON)
thread_pool: Any = pytest.importorskip(f"{_STDLIB}.test_thread_pool", reason=_REASON)
wait: Any = pytest.importorskip(f"{_STDLIB}.test_wait", reason=_REASON)

_SUBPROCESS = "runs 'from concurrent.futures import <executor type>' in a subprocess"
_THREAD_POOL = "tests ThreadPoolExecutor internals"

# Each stdlib test class, built on its generic mixin or on its thread-pool class when that
# adds generic tests, with the tests that cannot apply to another executor type.
_SUITES: dict[str, tuple[tuple[type, ...], dict[str, str]]] = {
    "ExecutorTest": (
        (thread_pool.ThreadPoolExecutorTest,),
        {
            "test_default_workers": f"{_THREAD_POOL} (its default is min(32, cpus + 4))",
            "test_saturation": f"{_THREAD_POOL} (executor._threads)",
            "test_idle_thread_reuse": f"{_THREAD_POOL} (executor._threads)",
            "test_hang_global_shutdown_lock": (
                "runs ThreadPoolExecutor and a forked ProcessPoolExecutor, not the executor "
                "under test"
            ),
        },
    ),
    "WaitTests": ((wait.ThreadPoolWaitTests,), {}),
    "AsCompletedTests": (
        (as_completed.AsCompletedTests, util.ExecutorMixin, util.BaseTestCase),
        {},
    ),
    "ShutdownTest": (
        (shutdown.ExecutorShutdownTest, util.ExecutorMixin, util.BaseTestCase),
        {
            "test_interpreter_shutdown": _SUBPROCESS,
            "test_submit_after_interpreter_shutdown": _SUBPROCESS,
            "test_hang_gh83386": _SUBPROCESS,
        },
    ),
}


def _skipped(reason: str) -> Any:
    @unittest.skip(reason)
    def test(self: unittest.TestCase) -> None:
        pass  # never runs: unittest skips it

    return test


def _make_class(backend_name: str, suite: str) -> type:
    backend, options, _ = POOL_BACKENDS[backend_name]
    bases, skips = _SUITES[suite]
    attributes: dict[str, Any] = {
        "__module__": __name__,
        "pool_backend": backend_name,
        # The tests call it as executor_type(max_workers=n), and compare it with
        # ProcessPoolExecutor.
        "executor_type": staticmethod(
            partial(PortalPool, backend=backend, backend_options=options)
        ),
        "executor_kwargs": {},
    }
    attributes.update({name: _skipped(reason) for name, reason in skips.items()})
    return type(f"{backend_name.capitalize()}{suite}", bases, attributes)


def _make_classes() -> None:
    for backend_name, (_, _, module) in POOL_BACKENDS.items():
        if _installed(module):
            for suite in _SUITES:
                made = _make_class(backend_name, suite)
                globals()[made.__name__] = made


_make_classes()
