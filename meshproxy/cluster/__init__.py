"""Clusters at runtime: endpoints, load balancing, outlier detection, circuit breakers.

``ClusterManager(clock, rng)`` -> ``update(snapshot)``, ``get(name) -> ClusterState``.
``ClusterState``: ``pick_host`` (``pick``), ``host_started/finished``, ``record_host``, ``admit_*/release_*``,
``stats``.  See :mod:`meshproxy.cluster.state`, ``.balancer`` and ``.outlier``.
"""
from .state import ClusterManager, ClusterState

__all__ = ["ClusterManager", "ClusterState"]
