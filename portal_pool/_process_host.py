"""The process host: each worker's event loop in a child process of its own.

An event loop cannot be pickled, so none is sent: each child makes its own, as an
ordinary thread-host worker (see ``_process_child``), and only the work crosses. Calls
are pickled inside ``submit``, in the caller's thread, so a call that cannot be sent
fails there, naming the part that can't be pickled. The parent's end of each child is a
:class:`~portal_pool._process_loop.ProcessLoop`.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
from typing import TYPE_CHECKING, Any

from ._chunks import run_chunk_asyncio, run_chunk_trio
from ._host import cpu_count
from ._pickling import encode_call, run_encoded
from ._process_loop import ProcessLoop

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from ._host import LoopSettings
    from ._worker import Worker

_FORK_REFUSED = (
    "ProcessHost cannot use the 'fork' start method: the parent runs threads (the "
    "workers' links, and maybe a caller's event loop), and a child forked from it may "
    "inherit a lock that one of them held, and hang. Use 'forkserver' (the default "
    "where available) or 'spawn'"
)


class ProcessHost:
    """Each worker's event loop runs in a child process, for CPU-bound Python code.

    Calls, arguments, results and exceptions cross as pickles (lambdas and closures by
    value, with cloudpickle). Each child runs many tasks at once in its loop;
    ``max_concurrency`` bounds how many are sent to it, and the rest wait in the
    parent, where a child's death cannot take them.

    :param mp_context: a :mod:`multiprocessing` context or start method name; ``None``
        means ``"forkserver"`` where the platform has it, else ``"spawn"``
    :raises ValueError: for ``"fork"``, or a start method this platform lacks
    """

    name = "process"

    def __init__(self, mp_context: BaseContext | str | None = None) -> None:
        if mp_context is None:
            methods = multiprocessing.get_all_start_methods()
            mp_context = "forkserver" if "forkserver" in methods else "spawn"
        if isinstance(mp_context, str):
            mp_context = multiprocessing.get_context(mp_context)
        if mp_context.get_start_method() == "fork":
            raise ValueError(_FORK_REFUSED)
        self._context = mp_context

    def __repr__(self) -> str:
        return f"ProcessHost(mp_context={self._context.get_start_method()!r})"

    @property
    def mp_context(self) -> BaseContext:
        """The :mod:`multiprocessing` context that starts the children."""
        return self._context

    def _host_worker(self, worker: Worker[Any], settings: LoopSettings) -> ProcessLoop:
        if self._context.get_start_method() == "forkserver":
            _preload_in_forkserver(settings)
        return ProcessLoop(worker, settings, self._context)

    def _default_max_workers(self) -> int:
        return cpu_count()

    def _call_encoder(self) -> Any:
        return encode_for_worker


def _preload_in_forkserver(settings: LoopSettings) -> None:
    """Have the forkserver import what every worker process needs, once.

    Each child is then forked with the imports done: a worker process starts in about a
    quarter of the time (0.04 s instead of 0.16 s for two asyncio workers, here). It
    takes effect only if the forkserver has not started yet, and adds to its list rather
    than replacing it (the list is private to multiprocessing: read with a default).
    """
    modules = ["portal_pool._process_child"]
    if settings.backend == "trio":
        modules += ["trio", "anyio._backends._trio"]
    else:
        modules.append("anyio._backends._asyncio")
        if settings.backend_options.get("use_uvloop"):
            modules.append("uvloop")
    # A missing module is skipped by the forkserver itself.
    current: list[str] = getattr(forkserver._forkserver, "_preload_modules", None) or ["__main__"]
    wanted = list(dict.fromkeys([*current, *modules]))
    if wanted != current:
        forkserver.set_forkserver_preload(wanted)


def encode_for_worker(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[bytes], dict[str, Any]]:
    # The call the child runs: run_encoded(blob), which unpickles and makes the call.
    try:
        return run_encoded, (encode_call(fn, args, kwargs),), {}
    except TypeError:
        if fn in (run_chunk_asyncio, run_chunk_trio):
            _name_the_unsendable_item(*args)
        raise


def _name_the_unsendable_item(fn: Any, chunk: tuple[tuple[Any, ...], ...]) -> None:
    """A map chunk cannot be pickled: raise what naming the callable or the item says.

    Without this, the error would name the chunk as a whole (``args[1]``, a tuple).
    """
    encode_call(fn, (), {})  # raises, naming "the callable", if that is what fails
    for position, item in enumerate(chunk):
        try:
            encode_call(fn, item, {})
        except TypeError as exc:
            raise TypeError(f"item {position} of a map chunk: {exc}") from exc.__cause__
