"""What may be submitted, checked in the caller's thread before anything is queued, and
the ``worker_context`` a worker enters."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from inspect import (
    CO_ASYNC_GENERATOR,
    CORO_CREATED,
    getcoroutinestate,
    isasyncgen,
    isasyncgenfunction,
    iscoroutine,
)
from types import FunctionType
from typing import Any

from ._exceptions import safe_repr


def check_callable(fn: object) -> None:
    """Reject what can't be submitted, before anything is queued.

    :raises TypeError: for anything but a callable, and for an async generator function,
        whose call returns a generator without running any of its body
    """
    if callable(fn):
        # A task awaits what the call returns if that is awaitable; an async generator
        # is not, so its body would never run. isasyncgenfunction also sees through
        # bound methods and functools.partial; a plain function, the common case on
        # every submit, is read directly at a third of the cost.
        if (
            fn.__code__.co_flags & CO_ASYNC_GENERATOR
            if isinstance(fn, FunctionType)
            else isasyncgenfunction(fn)
        ):
            raise TypeError(
                f"{_name_of(fn)} is an async generator function: a task would create the "
                f"generator and never run it; {_ITERATE_IT.format(_name_of(fn))}"
            )
        return
    if iscoroutine(fn):
        name = getattr(fn, "__name__", "fn")
        # No "coroutine was never awaited" warning for the caller's mistake. Only one that
        # never ran warns; closing one that did would throw into whoever is running it.
        if getcoroutinestate(fn) == CORO_CREATED:
            fn.close()
        raise TypeError(
            f"expected a callable but got a coroutine object; pass the function and "
            f"its arguments instead, e.g. submit({name}, arg) rather than "
            f"submit({name}(arg))"
        )
    if isasyncgen(fn):
        raise TypeError(
            f"expected a callable but got an async generator object; "
            f"{_ITERATE_IT.format(getattr(fn, '__name__', 'agen'))}"
        )
    raise TypeError(f"expected a callable, got {type(fn).__name__} {safe_repr(fn)}")


_ITERATE_IT = (
    "submit a coroutine function that iterates it instead, e.g. "
    "'async def collect(): return [x async for x in {0}(...)]'"
)


def _name_of(fn: object) -> str:
    while isinstance(fn, partial):
        fn = fn.func
    return str(getattr(fn, "__name__", "fn"))


def open_worker_context(factory: Callable[[], Any]) -> AbstractAsyncContextManager[Any]:
    """Call the pool's ``worker_context``; check that it gave an async context manager.

    :raises TypeError: for anything else
    """
    manager = factory()
    if not (hasattr(manager, "__aenter__") and hasattr(manager, "__aexit__")):
        raise TypeError(
            f"worker_context must be a zero-argument callable returning an async context "
            f"manager, but it returned {type(manager).__name__}; wrap an async generator "
            f"with @contextlib.asynccontextmanager"
        )
    return manager  # type: ignore[no-any-return]
