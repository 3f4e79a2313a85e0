"""Weighted traffic split: which destination (subset / cluster) a request goes to.

This picks a *destination*, not an endpoint: the cluster's load balancer picks the
endpoint afterwards (``meshproxy.cluster``).

Two algorithms, per route:

**Without a hash key: smooth weighted round robin** (nginx's ``ngx_http_upstream_get_peer``):
every pick adds each destination's weight to its ``current``, takes the destination with
the largest ``current`` (ties: the first in route order) and subtracts the total weight
from it.  Guarantee, per :class:`Splitter` (i.e. per worker): after any N picks, each
destination's count is within 1 of its exact share ``N * weight / sum(weights)``, the
sequence is interleaved (90/10 gives one v2 every ten requests, not ten in a row), and a
0-weight destination is never chosen.  State is per worker and not shared: with W workers
the total count of a destination is within W of its exact share (each worker is off by at
most 1).

**With a hash key: sticky version choice** (the destination service's DestinationRule has
``consistentHash``; fixes what istio/istio#9764 asks for).  The key is hashed with a
split-specific salt (BLAKE2b-64, so the same in every worker and process, and independent
of the ring hash the load balancer uses inside the chosen cluster) to a point ``u`` in
``[0, 1)``.  The destinations with weight > 0 are laid out on ``[0, 1)`` as consecutive
intervals of length ``weight / total`` in a *stable order* (sorted by host, subset, port,
cluster — not by their order in the YAML, so reordering the route moves nobody), and the
key goes to the destination whose interval holds ``u``.  Guarantees:

* the same key gets the same destination as long as the weights stand, in every worker,
  in a fresh process, after a config reload;
* the share of keys per destination follows the weights (for many keys);
* two destinations (the canary case): moving weight ``d`` from one to the other moves
  exactly the keys in a band of width ``d`` and only in that direction (90/10 -> 50/50
  moves 40 % of the keys, all from v1 to v2; no key goes back from v2 to v1);
* more destinations: moving weight between two destinations adjacent in the stable order
  moves only keys between those two; between non-adjacent ones, the intervals in between
  slide by ``d`` and so up to ``2d`` of keys move.  Cumulative cutting cannot do better
  without history, and history would break the "fresh process agrees" guarantee.

State survives a snapshot swap: a route's state is found again by a stable key
``(route.source, route.name, route.destinations)``, so a route whose destinations and
weights are unchanged keeps its SWRR position.  A route's state is made on its first pick
(from the previous splitter's state for that key, if it had one), so a swap costs nothing
per route; a route not picked during a whole snapshot's life starts afresh after the next.
"""
from __future__ import annotations

import hashlib
import random
from typing import Mapping

from ..config.model import ConsistentHash, HttpRoute, RetryPolicy, Snapshot, TcpRoute, WeightedDestination
from .request import RequestView
from .retry import RetryState

_SPLIT_SALT = b"meshproxy-split"
_TWO_64 = float(1 << 64)


def split_point(hash_key: bytes) -> float:
    """The point in ``[0, 1)`` a hash key lands on for the version split."""
    digest = hashlib.blake2b(hash_key, digest_size=8, salt=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def hash_key_for(policy: ConsistentHash, req: RequestView, cookie_value: str | None = None) -> bytes | None:
    """The consistent-hash key of ``req`` under ``policy`` (Istio ``consistentHash``), or
    ``None`` when the request does not carry it (then the split and the load balancer
    fall back to their non-sticky algorithms).

    ``cookie_value`` overrides the cookie read from the request: the caller passes the
    value it generated when the cookie was absent and ``policy.cookie_ttl`` asks to set
    one (Envoy generates and sets the cookie on the response).
    """
    key = policy.key
    if key == "header":
        value = req.headers.get(policy.name)
    elif key == "cookie":
        value = cookie_value if cookie_value is not None else req.cookie(policy.name)
    elif key == "source_ip":
        value = req.source_ip or None
    elif key == "query":
        value = req.query_params.get(policy.name)
    elif key == "none":                         # useSourceIp: false
        return None
    else:
        raise ValueError(f"consistentHash key {key!r} is not header/cookie/source_ip/query")
    if value is None:
        return None
    return value.encode("latin-1", "replace")


class _RouteSplit:
    """Split state of one route (or TCP route), and the route's retry deciders."""

    __slots__ = ("single", "dests", "weights", "current", "total", "cuts", "ordered",
                 "hash_policy", "_retry_states")

    def __init__(self, destinations: tuple[WeightedDestination, ...],
                 hash_policy: ConsistentHash | None):
        live = [d for d in destinations if d.weight > 0]
        self.dests = live
        self.weights = [d.weight for d in live]
        self.current = [0] * len(live)
        self.total = sum(self.weights)
        self.single = live[0] if len(live) == 1 else None
        ordered = sorted(live, key=lambda d: (d.host, d.subset or "", d.port or 0, d.cluster))
        cuts, acc = [], 0
        for d in ordered:
            acc += d.weight
            cuts.append(acc / self.total)
        if cuts:
            cuts[-1] = 1.0
        self.ordered = ordered
        self.cuts = cuts
        self.hash_policy = hash_policy
        self._retry_states: dict[bytes, RetryState] = {}

    def retry_state(self, policy: RetryPolicy, method: bytes, rng: random.Random) -> RetryState:
        """The route's :class:`RetryState` for ``method``.  A RetryState depends only on the
        policy and the method, so one per method is built and shared by every request (methods
        are the codec's known methods: a bounded set)."""
        state = self._retry_states.get(method)
        if state is None or state.policy is not policy:
            state = self._retry_states[method] = RetryState(policy, method.decode("latin-1"), rng=rng)
        return state

    def pick(self, hash_key: bytes | None) -> WeightedDestination | None:
        single = self.single
        if single is not None:
            return single
        dests = self.dests
        if not dests:
            return None
        if hash_key is not None:
            u = split_point(hash_key)
            for i, cut in enumerate(self.cuts):
                if u < cut:
                    return self.ordered[i]
            return self.ordered[-1]
        # smooth weighted round robin
        current = self.current
        weights = self.weights
        best = 0
        best_value = None
        for i in range(len(current)):
            value = current[i] + weights[i]
            current[i] = value
            if best_value is None or value > best_value:
                best, best_value = i, value
        current[best] -= self.total
        return dests[best]

    def adopt(self, old: "_RouteSplit") -> None:
        self.current = list(old.current)


def _stable_key(route) -> tuple:
    if isinstance(route, TcpRoute):
        return ("tcp", route.source, route.destinations)
    return (route.source, route.name, route.destinations)


class Splitter:
    """Per-worker split state for one snapshot.  ``pick`` is the hot-path call."""

    def __init__(self, snapshot: Snapshot, rng: random.Random | None = None,
                 previous: "Splitter | None" = None):
        self.snapshot = snapshot
        self.rng = rng                  # unused by the deterministic algorithms; kept for the factory signature
        # id(route) -> (route, state): the route is kept so its id stays valid
        self._by_id: dict[int, tuple[object, _RouteSplit]] = {}
        self._by_key: dict[tuple, _RouteSplit] = {}
        # the route asked for last and its state: most requests of a worker take the route
        # the previous one took, found without id()'s int and a dict lookup
        self._last_route = self._last_split = None
        # a route gets its state on first use (a snapshot of 10,000 services has 10,000
        # routes; building them all would put that work on the loop at every swap): state of
        # the previous splitter's routes is adopted by stable key, for one generation
        self._old_by_key = previous._by_key if previous is not None else {}

    def _add(self, route, clusters, old_by_key) -> _RouteSplit:
        entry = self._by_id.get(id(route))
        if entry is not None and entry[0] is route:
            return entry[1]
        key = _stable_key(route)
        state = self._by_key.get(key)
        if state is None:
            state = _RouteSplit(route.destinations, _hash_policy(route.destinations, clusters))
            old = old_by_key.get(key)
            if old is not None:
                state.adopt(old)
            self._by_key[key] = state
        self._by_id[id(route)] = (route, state)
        return state

    def pick(self, route: HttpRoute, hash_key: bytes | None = None) -> WeightedDestination | None:
        """The destination for one request; ``None`` only when no destination has weight > 0.

        A route not in this splitter's snapshot (a request that read the previous
        snapshot, or a route built by hand) gets its state on first use."""
        return self.route_split(route).pick(hash_key)

    def route_split(self, route: HttpRoute) -> _RouteSplit:
        """The route's split state (``pick``, ``hash_policy``): one lookup per request, for
        callers that need both."""
        if route is self._last_route:
            return self._last_split
        entry = self._by_id.get(id(route))
        if entry is None or entry[0] is not route:
            state = self._add(route, self.snapshot.clusters, self._old_by_key)
        else:
            state = entry[1]
        self._last_route = route
        self._last_split = state
        return state

    def pick_tcp(self, route: TcpRoute) -> WeightedDestination | None:
        return self.pick(route, None)

    def hash_policy(self, route: HttpRoute, clusters=None) -> ConsistentHash | None:
        """The ``consistentHash`` that makes this route sticky: the first destination (in
        route order) whose cluster's load balancer hashes; computed once per route.
        (``clusters`` is accepted for the caller's convenience and not needed.)"""
        return self.route_split(route).hash_policy


def _hash_policy(destinations, clusters: Mapping) -> ConsistentHash | None:
    for d in destinations:
        cluster = clusters.get(d.cluster) if d.cluster else None
        if cluster is not None and cluster.policy.load_balancer.consistent_hash is not None:
            return cluster.policy.load_balancer.consistent_hash
    return None
