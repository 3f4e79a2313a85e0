"""Run a real Worker inside the test's event loop on a hand-built snapshot.

For pipeline features (retries, faults, mirrors, header operations...) this skips
the YAML decode step and the process start, while the bytes still go through real
loopback sockets, the real codec, pools and pipeline.
"""
from __future__ import annotations

import random
from dataclasses import replace
from types import MappingProxyType

from meshproxy.bootstrap import Worker, WorkerOptions
from meshproxy.codec import DEFAULT_BACKEND
from meshproxy.config.model import (
    Cluster, Endpoint, HttpRoute, Listener, ProxySettings, RouteTable, Snapshot, TrafficPolicy, VirtualHost,
    WeightedDestination,
)
from meshproxy.config.store import SnapshotStore
from meshproxy.proxy.observe import Telemetry


def cluster(name: str, *ports: int, policy: TrafficPolicy | None = None, labels=None, subset=None) -> Cluster:
    return Cluster(name=name, service=name, port=80, subset=subset,
                   endpoints=tuple(Endpoint("127.0.0.1", p, MappingProxyType(labels or {})) for p in ports),
                   policy=policy or TrafficPolicy(), labels=MappingProxyType(labels or {}))


def dest(cluster_name: str, weight: int = 100, **kw) -> WeightedDestination:
    return WeightedDestination(host=cluster_name, subset=None, port=None, weight=weight, cluster=cluster_name, **kw)


def snapshot(routes: list[HttpRoute], clusters: list[Cluster], domains=("svc.local",), port: int = 0,
             settings: ProxySettings | None = None, version: str = "v1") -> Snapshot:
    vhost = VirtualHost(name="default/svc", domains=tuple(domains), routes=tuple(routes))
    table = RouteTable(name="http", exact=MappingProxyType({d: vhost for d in domains}))
    return Snapshot(version=version, listeners=(Listener("http", "127.0.0.1", port, "HTTP", route_table="http"),),
                    route_tables=MappingProxyType({"http": table}),
                    clusters=MappingProxyType({c.name: c for c in clusters}),
                    settings=settings or ProxySettings())


async def start_worker(loop, snap: Snapshot, codec: str = DEFAULT_BACKEND, seed: int = 1) -> tuple[Worker, int]:
    store = SnapshotStore(snap)
    worker = Worker(loop, store, WorkerOptions(codec=codec), Telemetry(), rng=random.Random(seed))
    await worker.start()
    (address, port), = list(worker.http_listeners.keys())
    port = next(iter(worker.http_listeners.values())).port
    return worker, port
