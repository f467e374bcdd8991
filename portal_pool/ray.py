"""Workers in Ray actors: one pool across a cluster, on asyncio, uvloop or trio.

Needs Ray (``pip install portal_pool[ray]``); importing this module does not import Ray,
making a :class:`RayHost` does::

    from portal_pool import PortalPool
    from portal_pool.ray import RayHost

    with PortalPool(8, backend="trio", host=RayHost(num_cpus=1)) as pool:
        print(pool.map(fetch, urls))
"""

from ._ray_host import RayHost

__all__ = ["RayHost"]
