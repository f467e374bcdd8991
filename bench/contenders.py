"""The contenders: how to open each one, submit to it, and make one round trip."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from portal_pool import PortalPool

from .raw_portal import RawPortals
from .seed_pattern import SeedPool
from .workloads import anyio_sleeper, asyncio_sleeper, trio_sleeper

AsyncFn = Callable[..., Coroutine[Any, Any, Any]]


class BenchPool(Protocol):
    """What every contender offers: per-item submit and a shutdown that joins."""

    def submit(self, fn: AsyncFn, /, *args: Any) -> Future[Any]: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class Contender:
    """One column of the table."""

    key: str
    label: str
    #: ``None`` for the seed and raw portals; otherwise the PortalPool backend arguments
    backend: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    #: the module that must be importable for this contender to run
    requires: str = "asyncio"

    @property
    def is_portal_pool(self) -> bool:
        return self.backend is not None

    @property
    def available(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None

    @property
    def sleeper(self) -> AsyncFn:
        """The 0.1 s sleeper this contender runs: the backend's own sleep, as user code
        written for that backend would call it (the raw portals run anyio's)."""
        if self.key == "portal":
            return anyio_sleeper
        return trio_sleeper if self.backend == "trio" else asyncio_sleeper

    @property
    def loop_kind(self) -> str:
        """Which bare event loop is this contender's floor."""
        if self.backend == "trio":
            return "trio"
        return "uvloop" if self.backend_options.get("use_uvloop") else "asyncio"

    def open(self, workers: int) -> BenchPool:
        """Start the contender with ``workers`` loops."""
        if self.key == "seed":
            return SeedPool(workers)
        if self.key == "portal":
            return RawPortals(workers, "asyncio")
        assert self.backend is not None
        return PortalPool(workers, backend=self.backend, backend_options=self.backend_options)

    @contextmanager
    def opened(self, workers: int) -> Iterator[BenchPool]:
        """Open, yield, and always shut down (joining every thread)."""
        pool = self.open(workers)
        try:
            yield pool
        finally:
            pool.shutdown()


def round_trip(pool: BenchPool) -> Callable[[AsyncFn], Any]:
    """The contender's own blocking call: ``pool.run``, ``portal.call``, or seed ``.result()``."""
    if isinstance(pool, (PortalPool, RawPortals)):
        return pool.run

    def seed_run(fn: AsyncFn) -> Any:
        return pool.submit(fn).result()

    return seed_run


SEED = Contender("seed", "seed pattern")
CONTENDERS: tuple[Contender, ...] = (
    SEED,
    Contender("portal", "anyio portals"),
    Contender("asyncio", "PortalPool asyncio", "asyncio"),
    Contender("uvloop", "PortalPool uvloop", "asyncio", {"use_uvloop": True}, "uvloop"),
    Contender("trio", "PortalPool trio", "trio", requires="trio"),
)
