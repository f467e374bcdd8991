"""Choosing a host from ``PortalPool(host=...)``."""

from __future__ import annotations

from ._exceptions import safe_repr
from ._host import Host
from ._process_host import ProcessHost
from ._thread_host import ThreadHost


def make_host(host: str | Host) -> Host:
    """The host object for ``host``.

    :raises ValueError: for anything but ``"thread"``, ``"process"``, ``"ray"`` or a host object
    :raises ImportError: for ``"ray"`` without Ray installed
    """
    if host == "thread":
        return ThreadHost()
    if host == "process":
        return ProcessHost()
    if host == "ray":
        from ._ray_host import RayHost  # its module imports no Ray; RayHost() does

        return RayHost()
    if not isinstance(host, str) and hasattr(host, "_host_worker"):
        return host
    raise ValueError(
        "host must be 'thread', 'process', 'ray', ThreadHost(), ProcessHost(...) or "
        f"RayHost(...), got {safe_repr(host)}"
    )
