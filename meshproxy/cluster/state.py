"""Runtime state of clusters: endpoints, load balancing, outlier ejection, circuit breakers.

One :class:`ClusterManager` per worker.  ``update(snapshot)`` builds a
:class:`ClusterState` per cluster and keeps the existing one (counters, ejections, round
robin position) when the cluster's config is unchanged; when only endpoints changed, the
state of endpoints that remain (by address and port) is carried over and new ones start
their slow-start window.

No sockets, no tasks: time comes from the injected ``clock``, randomness from ``rng``.
"""
from __future__ import annotations

import random
from typing import Callable

from ..config.model import Cluster, Endpoint, Snapshot, endpoint_tls
from .balancer import Host, balancer_name, make_balancer
from .outlier import EJECTED, OutlierDetector

RETRY_BUDGET_PERCENT = 20.0       # Envoy RetryBudget defaults (Istio retryBudget the same)
RETRY_BUDGET_MIN_CONCURRENCY = 3
SLOW_START_MIN_WEIGHT = 0.1       # Envoy SlowStartConfig.min_weight_percent 10 %
_NEVER = float("inf")
_SLOW_START_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN")


class _Counters:
    """Circuit-breaker and load counters of one cluster name.  Shared by the old and the
    new ClusterState when a cluster's config changes, so requests that started on the old
    state release what they took."""

    __slots__ = ("requests", "pending", "retries", "connections", "active", "overflow")

    def __init__(self):
        self.requests = 0      # admitted and not finished (max: http2MaxRequests)
        self.pending = 0       # waiting for an upstream connection (max: http1MaxPendingRequests)
        self.retries = self.connections = 0
        self.active = 0        # on an upstream connection
        self.overflow = {"requests": 0, "pending": 0, "retries": 0, "retry_budget": 0, "connections": 0}


def _key(item) -> tuple[str, int]:
    if isinstance(item, tuple):
        return item
    return (item.address, item.port)


class ClusterState:
    """One cluster at runtime.  See the package docstring for the semantics of each call."""

    def __init__(self, cluster: Cluster, clock: Callable[[], float], rng: random.Random,
                 previous: "ClusterState | None" = None, initial: bool = True):
        self.cluster = cluster
        self.name = cluster.name       # read per request (metrics, logs): a C attribute compiled
        self.clock = clock
        self.rng = rng
        policy = cluster.policy
        pool = policy.connection_pool
        self.lb_name = balancer_name(cluster)
        old_hosts = {h.key: h for h in previous.hosts} if previous is not None else {}
        now = clock()
        hosts: list[Host] = []
        for i, ep in enumerate(cluster.endpoints):
            tls = endpoint_tls(policy, ep)
            key = (ep.address, ep.port) if tls is None else (ep.address, ep.port, tls)
            old = old_hosts.get(key)
            if old is not None:
                host = old
                host.endpoint = ep
                host.weight = max(ep.weight, 0)
                host.index = i
            else:
                # endpoints present when a cluster first appears are not "new" (Envoy:
                # slow start is ineffective when all endpoints are new)
                host = Host(ep, float("-inf") if initial else now, i)
                if tls is not None:
                    host.key = key         # TLS origination: never shares a pool with plaintext
            hosts.append(host)
        self.hosts = hosts
        self.balancer = make_balancer(cluster, hosts, rng)
        self.passthrough = self.lb_name == "PASSTHROUGH"
        self.outlier = OutlierDetector(policy.outlier, clock) if policy.outlier is not None else None
        self.min_health = policy.outlier.min_health_percent if policy.outlier is not None else 0
        warmup = policy.load_balancer.warmup
        self.warmup = warmup if warmup and self.lb_name in _SLOW_START_POLICIES else None
        self.max_requests = pool.max_requests
        self.max_pending = pool.max_pending_requests
        self.max_retries = pool.max_retries
        self.max_connections = pool.max_connections
        # the upstream pool's settings, read for every request (pipeline: acquire and release)
        self.idle_timeout = pool.idle_timeout
        self.max_idle_per_endpoint = pool.max_idle_per_endpoint
        self.max_requests_per_connection = pool.max_requests_per_connection
        self.counters = previous.counters if previous is not None else _Counters()
        self._candidates: list[Host] = hosts        # usable hosts; recomputed on health change
        self._next_change = _NEVER            # next ejection expiry or warm-up end
        self._refresh(now)

    # ---------------------------------------------------------------- health bookkeeping

    def _refresh(self, now: float) -> None:
        """Apply expired ejections; recompute the usable list and the next time it changes."""
        next_change = _NEVER
        healthy: list[Host] = []
        for h in self.hosts:
            if h.state is EJECTED:
                if h.ejected_until <= now:
                    OutlierDetector.expire(h, now)
                else:
                    next_change = min(next_change, h.ejected_until)
                    continue
            healthy.append(h)
        hosts = self.hosts
        self.panic = bool(hosts) and 100.0 * len(healthy) / len(hosts) < self.min_health
        self._candidates = hosts if (self.panic or len(healthy) == len(hosts)) else healthy
        self._warming = False
        if self.warmup is not None:
            ends = [h.added_at + self.warmup for h in hosts if h.added_at + self.warmup > now]
            if ends and len(ends) < len(hosts):
                self._warming = True
                next_change = min(next_change, min(ends))
        self._next_change = next_change

    def _slow_start_weight(self, host: Host) -> float:
        age = self.clock() - host.added_at
        if age >= self.warmup:
            return float(host.weight)
        return host.weight * max(SLOW_START_MIN_WEIGHT, age / self.warmup)

    # ---------------------------------------------------------------- endpoint choice

    def pick(self, hash_key: bytes | None = None, exclude=frozenset(),
             original: tuple[str, int] | None = None) -> Endpoint | None:
        """The endpoint of :meth:`pick_host`, or None."""
        host = self.pick_host(hash_key, exclude, original)
        return host.endpoint if host is not None else None

    def pick_host(self, hash_key: bytes | None = None, exclude=frozenset(),
                  original: tuple[str, int] | None = None) -> Host | None:
        """The host (an endpoint and its load and health) for one attempt, or None (no
        usable endpoint: 503 UH).  The proxy keeps it for the attempt's ``host_started``,
        ``host_finished`` and ``record_host``.

        ``exclude``: endpoints (or ``(address, port)`` pairs) already tried by this
        request; they are skipped unless nothing else is left, in which case None is
        returned and the caller may ask again without ``exclude``.  Ejected endpoints are
        skipped except in panic mode (usable share below ``min_health_percent``: all are
        used).  ``original``: the request's original destination, used by PASSTHROUGH."""
        if self.passthrough:     # the original destination: a host outside the cluster's list
            return Host(Endpoint(original[0], original[1]), -_NEVER) if original is not None else None
        if self._next_change != _NEVER and self.clock() >= self._next_change:
            self._refresh(self.clock())
        candidates = self._candidates
        if exclude:
            keys = {_key(x) for x in exclude}
            candidates = [h for h in candidates if h.key not in keys]
        if not candidates:
            return None
        return self.balancer.pick(candidates, hash_key, self._slow_start_weight if self._warming else None)

    def has_endpoint_besides(self, exclude) -> bool:
        """Whether an endpoint other than those in ``exclude`` (``(address, port)`` pairs)
        could take an attempt now."""
        if self.passthrough:
            return False
        if self._next_change != _NEVER and self.clock() >= self._next_change:
            self._refresh(self.clock())
        keys = {_key(x) for x in exclude}
        return any(h.key not in keys for h in self._candidates)

    # A Host outlives config changes that keep its address and port (``__init__`` carries it
    # over), so the one an attempt picked is the one its end must release.

    def host_started(self, host: Host | None) -> None:
        """A request was sent to ``host`` (LEAST_REQUEST load, retry budget)."""
        self.counters.active += 1
        if host is not None:
            host.active += 1

    def host_finished(self, host: Host | None) -> None:
        counters = self.counters
        if counters.active > 0:
            counters.active -= 1
        if host is not None and host.active > 0:
            host.active -= 1

    def record_host(self, host: Host | None, outcome: int | str) -> None:
        """The result of one attempt on ``host``: an HTTP status or "connect-failure",
        "reset", "timeout" (outlier detection; see ``meshproxy.cluster.outlier``)."""
        if self.outlier is None or host is None or self.passthrough:
            return
        if self.outlier.record(host, outcome, self.hosts):
            self._refresh(self.clock())

    # ---------------------------------------------------------------- circuit breakers

    # Envoy's HTTP/1 semantics: ``http2MaxRequests`` (Envoy max_requests) caps the requests
    # in flight on the cluster; ``http1MaxPendingRequests`` caps the requests that wait for
    # a connection (one is being opened, or ``maxConnections`` is reached and they queue
    # until a connection frees); ``maxConnections`` caps open connections.  Overflowing
    # either request cap is a 503 UO; reaching the connection cap makes requests wait.

    def admit_request(self) -> bool:
        """One more request in flight on this cluster (``http2MaxRequests``); False =
        overflow (503 UO).  Pair every True with ``release_request``."""
        c = self.counters
        if c.requests >= self.max_requests:
            c.overflow["requests"] += 1
            return False
        c.requests += 1
        return True

    def release_request(self) -> None:
        c = self.counters
        if c.requests > 0:
            c.requests -= 1

    def admit_pending(self) -> bool:
        """One more request waiting for an upstream connection (``http1MaxPendingRequests``);
        False = overflow (503 UO).  Pair every True with ``release_pending``."""
        c = self.counters
        if c.pending >= self.max_pending:
            c.overflow["pending"] += 1
            return False
        c.pending += 1
        return True

    def release_pending(self) -> None:
        c = self.counters
        if c.pending > 0:
            c.pending -= 1

    def retry_budget(self) -> int:
        """Concurrent retries allowed now: 20 % of the requests in flight (those admitted
        by ``admit_request`` or started on an endpoint, whichever count is larger), at
        least 3 (Envoy's ``RetryBudget`` defaults)."""
        c = self.counters
        in_flight = c.requests if c.requests > c.active else c.active
        return max(RETRY_BUDGET_MIN_CONCURRENCY, int(in_flight * RETRY_BUDGET_PERCENT / 100.0))

    def admit_retry(self, budget: bool = True) -> bool:
        """One more concurrent retry: within ``maxRetries`` and, unless ``budget`` is False,
        within the retry budget.  Pair every True with ``release_retry`` (when the retry is
        sent or abandoned)."""
        c = self.counters
        if c.retries >= self.max_retries:
            c.overflow["retries"] += 1
            return False
        if budget and c.retries >= self.retry_budget():
            c.overflow["retry_budget"] += 1
            return False
        c.retries += 1
        return True

    def release_retry(self) -> None:
        c = self.counters
        if c.retries > 0:
            c.retries -= 1

    def admit_connection(self) -> bool:
        """One more upstream connection (``tcp.maxConnections``)."""
        c = self.counters
        if c.connections >= self.max_connections:
            c.overflow["connections"] += 1
            return False
        c.connections += 1
        return True

    def force_connection(self) -> None:
        """Count a connection opened over ``maxConnections``: Envoy lets an endpoint with
        no connection at all open one, or requests queued for it could never be served."""
        self.counters.connections += 1

    def release_connection(self) -> None:
        c = self.counters
        if c.connections > 0:
            c.connections -= 1

    # ---------------------------------------------------------------- admin

    def stats(self) -> dict:
        now = self.clock()
        if self._next_change != _NEVER and now >= self._next_change:
            self._refresh(now)
        endpoints = []
        for h in self.hosts:
            warming = self.warmup is not None and h.added_at + self.warmup > now
            endpoints.append({
                "address": h.endpoint.address,
                "port": h.endpoint.port,
                "health": h.state,
                "ejected_until": h.ejected_until,
                "ejected_for": max(0.0, h.ejected_until - now) if h.ejected_until is not None else None,
                "ejection_reason": h.ejection_reason or None,
                "times_ejected": h.times_ejected,
                "active_requests": h.active,
                "weight": h.weight,
                "effective_weight": self._slow_start_weight(h) if warming else float(h.weight),
                "locality": h.endpoint.locality,
            })
        return {
            "name": self.cluster.name,
            "service": self.cluster.service,
            "subset": self.cluster.subset,
            "lb": self.lb_name,
            "panic": self.panic,
            "requests": self.counters.requests,
            "active_requests": self.counters.active,
            "pending_requests": self.counters.pending,
            "active_retries": self.counters.retries,
            "retry_budget": self.retry_budget(),
            "connections": self.counters.connections,
            "limits": {"max_requests": self.max_requests, "max_pending_requests": self.max_pending,
                       "max_retries": self.max_retries, "max_connections": self.max_connections},
            "overflow": dict(self.counters.overflow),
            "ejections_total": self.outlier.ejection_count if self.outlier is not None else 0,
            "endpoints": endpoints,
        }


class ClusterManager:
    """All clusters of one worker."""

    def __init__(self, clock: Callable[[], float], rng: random.Random):
        self.clock = clock
        self.rng = rng
        self._clusters: dict[str, ClusterState] = {}
        self._seen_update = False

    def get(self, name: str) -> ClusterState | None:
        """The ClusterState of cluster ``name``, or None (compiled: a C call per request)."""
        return self._clusters.get(name)

    def update(self, snapshot: Snapshot) -> None:
        """Adopt the clusters of ``snapshot``: unchanged ones keep their state object,
        changed ones get a new state carrying per-endpoint state over, removed ones go."""
        new: dict[str, ClusterState] = {}
        initial = not self._seen_update
        for name, cluster in snapshot.clusters.items():
            old = self._clusters.get(name)
            if old is not None and (old.cluster is cluster or old.cluster == cluster):
                if old.cluster is not cluster:
                    old.cluster = cluster
                new[name] = old
            else:
                new[name] = ClusterState(cluster, self.clock, self.rng, previous=old,
                                         initial=initial or old is None)
        self._clusters = new
        self._seen_update = True

    def update_only(self, snapshot: Snapshot, names) -> None:
        """Like :meth:`update` when only the clusters ``names`` differ from the last update
        (an endpoint patch): the cost is theirs, not the whole snapshot's."""
        clusters = self._clusters
        for name in names:
            cluster = snapshot.clusters.get(name)
            old = clusters.get(name)
            if cluster is None:
                clusters.pop(name, None)
            elif old is not None and (old.cluster is cluster or old.cluster == cluster):
                old.cluster = cluster
            else:
                clusters[name] = ClusterState(cluster, self.clock, self.rng, previous=old, initial=old is None)

    def __iter__(self):
        return iter(self._clusters.values())

    def stats(self) -> dict:
        return {name: state.stats() for name, state in sorted(self._clusters.items())}
