"""What the request path reads: one :class:`Runtime` per worker.

The composition root (:mod:`meshproxy.bootstrap`) builds the parts and hands them in; the
request path (downstream driver, pipeline, mirrors, tunnels) reads them from here and from
nothing else.  Per snapshot, :meth:`Runtime.install` builds what depends on the config (the
split state, the cluster state) and only then makes the snapshot current, so a request reads
a snapshot whose runtime is complete.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from types import MappingProxyType
from typing import Callable

import cython

from .batch import SendBatch
from .clock import monotonic
from .cluster.state import ClusterManager
from .config.model import Endpoint, Snapshot
from .downstream.splice import Splice
from .proxy.observe import Telemetry
from .router.split import Splitter
from .upstream.pool import UpstreamPools


class Runtime:
    __slots__ = ("loop", "rng", "clock", "system_clock", "new_request_id", "telemetry", "clusters", "pools",
                 "batch", "splitter", "snapshot", "settings", "draining", "make_request_parser", "tunnels",
                 "mirror_tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, telemetry: Telemetry, clusters: ClusterManager,
                 pools: UpstreamPools, batch: SendBatch, make_request_parser: Callable, rng: random.Random,
                 clock: Callable[[], float], system_clock: bool, new_request_id: Callable[[], bytes]):
        self.loop = loop
        self.rng = rng
        self.clock = clock                       # injectable; ``now()`` reads it
        self.system_clock = system_clock         # compiled, ``now()`` then reads CLOCK_MONOTONIC at C level
        self.new_request_id = new_request_id     # an x-request-id when tracing does not make one
        self.telemetry = telemetry
        self.clusters = clusters
        self.pools = pools
        self.batch = batch                       # where the connections' writes go (batch.py)
        self.make_request_parser = make_request_parser
        self.splitter: Splitter | None = None
        self.snapshot: Snapshot | None = None    # what requests route on (set by install)
        self.settings = None
        self.draining = False
        self.tunnels: set[Splice] = set()        # upgraded connections, owned here until they close
        self.mirror_tasks: set[asyncio.Task] = set()

    def install(self, snapshot: Snapshot, changed_clusters=None) -> None:
        """The runtime built from ``snapshot``, then the snapshot itself: requests that already
        read the old snapshot keep it; the next request reads the new one.  ``changed_clusters``:
        an endpoint patch changed only these (config/incremental.py); None rebuilds every one."""
        self.settings = snapshot.settings
        if changed_clusters is not None:          # an endpoint patch: only these clusters differ (no DNS ones)
            self.clusters.update_only(snapshot, changed_clusters)
        else:
            self.clusters.update(with_dns_endpoints(snapshot))
        old = self.splitter
        if old is not None and old.snapshot.route_tables is snapshot.route_tables \
                and old.snapshot.listeners is snapshot.listeners:
            old.snapshot = snapshot      # endpoints patched: same routes, same split state
        else:
            self.splitter = Splitter(snapshot, rng=self.rng, previous=old)
        self.telemetry.on_snapshot(snapshot)
        self.snapshot = snapshot

    def now(self) -> float:
        """``clock()``: compiled with the default clock, CLOCK_MONOTONIC read at C level."""
        if cython.compiled and self.system_clock:
            return monotonic()
        return self.clock()

    def start_tunnel(self, down, conn, to_upstream: bytes, to_downstream: bytes) -> None:
        """A 101 Switching Protocols: from here on the two connections are spliced as bytes."""
        down.listener.connection_closed(down)

        def finished(sent: int, received: int) -> None:
            self.tunnels.discard(splice)

        splice = Splice(self.loop, down.transport, conn.transport,
                        idle_timeout=self.settings.tcp_idle_timeout,
                        initial_to_upstream=to_upstream, initial_to_downstream=to_downstream,
                        on_close=finished)
        self.tunnels.add(splice)
        splice.start()


def with_dns_endpoints(snapshot: Snapshot) -> Snapshot:
    """ServiceEntry ``resolution: DNS`` clusters carry names, not addresses: give the
    cluster runtime one endpoint per name; the upstream pools resolve each name when
    they connect (cached, last good answer kept on failure)."""
    dns = {name: c for name, c in snapshot.clusters.items() if c.resolution == "DNS" and not c.endpoints}
    if not dns:
        return snapshot
    clusters = dict(snapshot.clusters)
    for name, c in dns.items():
        clusters[name] = replace(c, endpoints=tuple(Endpoint(host, port) for host, port in c.dns_hosts))
    return replace(snapshot, clusters=MappingProxyType(clusters))
