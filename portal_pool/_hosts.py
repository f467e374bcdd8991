"""Choosing a host from ``PortalPool(host=...)``."""

from __future__ import annotations

from ._exceptions import safe_repr
from ._host import Host
from ._process_host import ProcessHost
from ._thread_host import ThreadHost


def make_host(host: str | Host) -> Host:
    """The host object for ``host``.

    :raises ValueError: for anything but ``"thread"``, ``"process"`` or a host object
    """
    if host == "thread":
        return ThreadHost()
    if host == "process":
        return ProcessHost()
    if not isinstance(host, str) and hasattr(host, "_host_worker"):
        return host
    raise ValueError(
        f"host must be 'thread', 'process', ThreadHost() or ProcessHost(...), got {safe_repr(host)}"
    )
