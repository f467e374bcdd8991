"""The Ray host: each worker's event loop in a Ray actor, anywhere on a cluster.

Ray places, starts and restarts the actors and carries the data; the pool keeps its own
inbox, credit window and futures in this process, as for worker processes. The pool's end
of each actor is a :class:`~portal_pool._ray_loop.RayLoop`; the actor is a
:class:`~portal_pool._ray_actor.WorkerActor`.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._exceptions import safe_repr
from ._process_host import encode_for_worker
from ._ray_loop import RayLoop

if TYPE_CHECKING:
    from ._host import LoopSettings
    from ._worker import Worker

# Ray's own limit on an actor's calls running at once, set out of the way.
_RAY_CALLS_MAX = 1_000_000


def import_ray() -> Any:
    """The ``ray`` module.

    :raises ImportError: if Ray is not installed, saying how to install it
    """
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError(
            "RayHost needs Ray, which is not installed: install portal_pool[ray]"
        ) from exc


class RayHost:
    """Each worker's event loop runs in a Ray actor, on whatever node Ray places it.

    The pool joins the Ray runtime this process has started (``ray.init(...)``), or, if
    none is running, starts Ray's default, as Ray itself does on first use. It never
    shuts Ray down, and kills its own actors at ``shutdown()``. Calls, arguments, results
    and exceptions cross as pickles, as for :class:`~portal_pool.ProcessHost`.

    :param num_cpus: CPUs each worker's actor reserves (Ray's ``num_cpus``)
    :param resources: other resources each actor reserves (Ray's ``resources``)
    :param scheduling_strategy: where Ray places the actors: ``"SPREAD"``, a placement
        group or node-affinity strategy (Ray's ``scheduling_strategy``)
    :param runtime_env: the actors' code and dependencies (Ray's ``runtime_env``)
    :param max_restarts: how many times Ray restarts a worker's actor that dies
        (``-1``: always); its work in flight fails with ``BrokenPortalPool``
    :raises ImportError: if Ray is not installed
    :raises ValueError: for a negative ``num_cpus`` or a ``max_restarts`` below -1
    """

    name = "ray"

    def __init__(
        self,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        scheduling_strategy: Any = None,
        runtime_env: Mapping[str, Any] | None = None,
        max_restarts: int = -1,
    ) -> None:
        self._ray = import_ray()
        if not num_cpus >= 0:
            raise ValueError(f"num_cpus must be a number >= 0, got {safe_repr(num_cpus)}")
        if not isinstance(max_restarts, int) or max_restarts < -1:
            raise ValueError(
                f"max_restarts must be an integer >= -1 (-1: always), got {safe_repr(max_restarts)}"
            )
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.scheduling_strategy = scheduling_strategy
        self.runtime_env = None if runtime_env is None else dict(runtime_env)
        self.max_restarts = max_restarts
        self._actor_class: Any = None

    def __repr__(self) -> str:
        return (
            f"RayHost(num_cpus={self.num_cpus!r}, resources={self.resources!r}, "
            f"scheduling_strategy={self.scheduling_strategy!r}, "
            f"runtime_env={self.runtime_env!r}, max_restarts={self.max_restarts!r})"
        )

    def _connect(self) -> Any:
        ray = self._ray
        if not ray.is_initialized():
            ray.init()  # what Ray does on first use: RAY_ADDRESS, else a local runtime
        return ray

    def _default_max_workers(self) -> int:
        cpus = self._connect().cluster_resources().get("CPU", 1)
        return max(1, int(cpus))

    def _host_worker(self, worker: Worker[Any], settings: LoopSettings) -> RayLoop:
        ray = self._connect()
        if self._actor_class is None:
            from ._ray_actor import WorkerActor

            self._actor_class = ray.remote(concurrency_groups={"control": 16})(WorkerActor)
        options = {
            "num_cpus": self.num_cpus,
            "resources": self.resources,
            "scheduling_strategy": self.scheduling_strategy,
            "runtime_env": self.runtime_env,
            "max_restarts": self.max_restarts,
            # At most once: Ray must not run a call again on a restarted actor.
            "max_task_retries": 0,
            # No limit of Ray's on the calls running at once: max_concurrency is the
            # pool's own credit window, in this process.
            "max_concurrency": _RAY_CALLS_MAX,
            # A name shows whose actor it is, in Ray's dashboard and list_named_actors():
            # the pool's thread_name_prefix, as for its threads and worker processes.
            "name": f"{settings.thread_name_prefix}-{uuid.uuid4().hex[:12]}-{worker.index}",
        }
        actor = self._actor_class.options(**options)
        return RayLoop(worker, settings, ray, actor, self.max_restarts)

    def _call_encoder(self) -> Any:
        return encode_for_worker
