"""Load balancers: pick one endpoint of a cluster.  Chosen by name from :data:`BALANCERS`.

Every balancer gets ``candidates``: the endpoints it may use for this pick (healthy ones,
or all of them in panic mode, minus those the caller excluded), never empty, plus the
request's hash key.  Hash balancers also see the full host list so that their structure
(ring / table) does not change when an endpoint is ejected: they walk on to the next
usable endpoint instead, so only the keys of the missing endpoint move.
"""
from __future__ import annotations

import bisect
import hashlib
import random
from typing import Callable, Protocol

from ..config.model import Cluster, Endpoint


class Host:
    """Runtime record of one endpoint: load, health, slow start."""

    __slots__ = ("endpoint", "key", "weight", "active", "added_at", "state", "ejected_until",
                 "times_ejected", "healthy_since", "consecutive_5xx", "consecutive_gateway",
                 "ejection_reason", "ejections_overflowed", "rr_current", "index", "pool", "consecutive_local")

    def __init__(self, endpoint: Endpoint, added_at: float, index: int = 0):
        self.endpoint = endpoint
        self.key = (endpoint.address, endpoint.port)
        self.weight = max(endpoint.weight, 0)
        self.active = 0
        self.added_at = added_at
        self.state = "healthy"
        self.ejected_until: float | None = None
        self.times_ejected = 0
        self.healthy_since: float | None = None
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0             # local-origin failures, counted apart when the policy splits them
        self.ejection_reason = ""
        self.ejections_overflowed = 0
        self.rr_current = 0.0
        self.index = index
        # the upstream connection pool for this endpoint, remembered by the exchange that first
        # needs it (opaque here; the worker's pools are never removed)
        self.pool = None


WeightFn = Callable[[Host], float]


class LoadBalancer(Protocol):
    def pick(self, candidates: list[Host], hash_key: bytes | None, weight: WeightFn | None) -> Host | None:
        """``weight`` is None when every candidate has its configured weight and none is
        warming up; otherwise it gives the effective (slow-start) weight."""


def _uniform(hosts: list[Host]) -> bool:
    return len({h.weight for h in hosts}) <= 1


class RoundRobin:
    """Equal weights: rotate.  Otherwise smooth weighted round robin over the
    candidates' (effective) weights."""

    def __init__(self, cluster: Cluster, hosts: list[Host], rng: random.Random):
        self.next = rng.randrange(1 << 16)       # workers do not start in lock-step
        self.uniform = _uniform(hosts)

    def pick(self, candidates, hash_key, weight):
        if weight is None and self.uniform:
            i = self.next
            self.next = i + 1
            return candidates[i % len(candidates)]
        total = 0.0
        best = None
        for h in candidates:
            w = weight(h) if weight is not None else h.weight
            total += w
            h.rr_current += w
            if best is None or h.rr_current > best.rr_current:
                best = h
        if best is not None:
            best.rr_current -= total
        return best


class LeastRequest:
    """Power of two choices (Envoy's default ``choice_count`` 2): two distinct random
    candidates, the one with fewer active requests (divided by its effective weight
    when weights differ) wins; ties go to the first drawn."""

    def __init__(self, cluster: Cluster, hosts: list[Host], rng: random.Random):
        self.rng = rng
        self.uniform = _uniform(hosts)

    def pick(self, candidates, hash_key, weight):
        n = len(candidates)
        if n == 1:
            return candidates[0]
        randrange = self.rng.randrange
        a = randrange(n)
        b = randrange(n - 1)
        if b >= a:
            b += 1
        ha, hb = candidates[a], candidates[b]
        if weight is None and self.uniform:
            return hb if hb.active < ha.active else ha
        wa = weight(ha) if weight is not None else ha.weight
        wb = weight(hb) if weight is not None else hb.weight
        # compare active/weight without dividing by zero
        return hb if hb.active * wa < ha.active * wb or (wa == 0 and wb > 0) else ha


class RandomBalancer:
    def __init__(self, cluster: Cluster, hosts: list[Host], rng: random.Random):
        self.rng = rng
        self.uniform = _uniform(hosts)

    def pick(self, candidates, hash_key, weight):
        if weight is None and self.uniform:
            return candidates[self.rng.randrange(len(candidates))]
        weights = [weight(h) if weight is not None else h.weight for h in candidates]
        if sum(weights) <= 0:
            return candidates[self.rng.randrange(len(candidates))]
        return self.rng.choices(candidates, weights)[0]


def key_hash(data: bytes) -> int:
    """64-bit hash used by ring hash and maglev (stable across processes; different from
    the split's salted hash so the version split and the endpoint choice are independent)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class RingHash:
    """Ketama-style ring (Envoy ``RING_HASH``): each endpoint gets ``K * weight`` points
    hashed from ``"address:port_i"``; a key goes to the first point clockwise from its hash.
    ``K`` is ``minimum_ring_size / total_weight`` rounded *up to a power of two*, so it stays
    the same when an endpoint comes or goes (unless the total crosses a power of two, and
    then the points of the smaller K are a subset of the larger): removing an endpoint
    moves only the keys that were on it.  Ejected or excluded endpoints are walked past,
    so only their keys move.  A request without a key gets a random point."""

    def __init__(self, cluster: Cluster, hosts: list[Host], rng: random.Random):
        self.rng = rng
        ch = cluster.policy.load_balancer.consistent_hash
        size = ch.minimum_ring_size if ch is not None else 1024
        total = sum(h.weight for h in hosts) or 1
        per_weight = 1
        while per_weight * total < size:
            per_weight *= 2
        points = []
        for h in hosts:
            if h.weight <= 0:
                continue
            replicas = per_weight * h.weight
            base = f"{h.key[0]}:{h.key[1]}_".encode()
            for i in range(replicas):
                points.append((key_hash(base + str(i).encode()), h.index))
        points.sort()
        self.hashes = [p[0] for p in points]
        self.owners = [hosts[p[1]] for p in points]

    def pick(self, candidates, hash_key, weight):
        owners = self.owners
        if not owners:
            return None
        if hash_key is None:
            start = self.rng.randrange(len(owners))
        else:
            start = bisect.bisect_left(self.hashes, key_hash(hash_key))
        n = len(owners)
        first = owners[start % n]
        if _all_present(candidates, first):
            return first
        usable = {h.index for h in candidates}
        for step in range(n):
            h = owners[(start + step) % n]
            if h.index in usable:
                return h
        return None


def _all_present(candidates, host) -> bool:
    """Sufficient test that ``host`` is a candidate, exact in the common case where the
    candidates are the full host list (each host sits at its own index)."""
    return host.index < len(candidates) and candidates[host.index] is host


def _next_prime(n: int) -> int:
    def prime(k):
        if k < 2:
            return False
        i = 2
        while i * i <= k:
            if k % i == 0:
                return False
            i += 1
        return True
    while not prime(n):
        n += 1
    return n


class Maglev:
    """Maglev lookup table (Envoy ``MAGLEV``).  Table size: the smallest prime at least
    ``max(minimum_ring_size, 100 * endpoints)``, at most 65537 (Envoy's default size;
    the model has no ``tableSize`` yet).  Weighted: an endpoint of weight w claims w slots
    per round.  Built once per cluster config.  When the chosen endpoint cannot be used
    the key is re-hashed (up to 5 times), then the first usable candidate is taken."""

    def __init__(self, cluster: Cluster, hosts: list[Host], rng: random.Random):
        self.rng = rng
        ch = cluster.policy.load_balancer.consistent_hash
        wanted = max(ch.minimum_ring_size if ch is not None else 1024, 100 * len(hosts))
        size = _next_prime(min(wanted, 65537))
        live = [h for h in hosts if h.weight > 0]
        table: list[Host | None] = [None] * size
        if live:
            offsets, skips, nexts = [], [], []
            for h in live:
                name = f"{h.key[0]}:{h.key[1]}".encode()
                offsets.append(key_hash(b"o" + name) % size)
                skips.append(key_hash(b"s" + name) % (size - 1) + 1)
                nexts.append(0)
            filled = 0
            while filled < size:
                for i, h in enumerate(live):
                    for _ in range(h.weight):
                        while True:
                            slot = (offsets[i] + nexts[i] * skips[i]) % size
                            nexts[i] += 1
                            if table[slot] is None:
                                break
                        table[slot] = h
                        filled += 1
                        if filled == size:
                            break
                    if filled == size:
                        break
        self.table = table

    def pick(self, candidates, hash_key, weight):
        table = self.table
        if table[0] is None:
            return None
        size = len(table)
        if hash_key is None:
            h = table[self.rng.randrange(size)]
        else:
            h = table[key_hash(hash_key) % size]
        if _all_present(candidates, h):
            return h
        usable = {c.index for c in candidates}
        for salt in range(1, 6):
            h = table[key_hash(hash_key + bytes([salt]) if hash_key else bytes([salt])) % size]
            if h.index in usable:
                return h
        return candidates[0]


class Passthrough:
    """Istio ``PASSTHROUGH``: no load balancing, the request goes to the address the
    client asked for.  The caller passes it as ``original=(address, port)`` to
    ``ClusterState.pick`` (the Host/authority of the request, or SO_ORIGINAL_DST when
    traffic is redirected by iptables); the endpoint list is not used.  Without an
    original destination there is nothing to pick (503 UH)."""

    def __init__(self, cluster: Cluster, hosts: list[Host], rng: random.Random):
        pass

    def pick(self, candidates, hash_key, weight):
        return None


BALANCERS: dict[str, Callable[[Cluster, list[Host], random.Random], LoadBalancer]] = {
    "ROUND_ROBIN": RoundRobin,
    "LEAST_REQUEST": LeastRequest,
    "LEAST_CONN": LeastRequest,          # deprecated Istio name, same algorithm
    "RANDOM": RandomBalancer,
    "PASSTHROUGH": Passthrough,
    "RING_HASH": RingHash,
    "MAGLEV": Maglev,
}


def balancer_name(cluster: Cluster) -> str:
    lb = cluster.policy.load_balancer
    if lb.consistent_hash is not None:
        return "MAGLEV" if lb.consistent_hash.algorithm == "maglev" else "RING_HASH"
    return lb.simple or "LEAST_REQUEST"


def make_balancer(cluster: Cluster, hosts: list[Host], rng: random.Random) -> LoadBalancer:
    name = balancer_name(cluster)
    try:
        factory = BALANCERS[name]
    except KeyError:
        raise ValueError(f"cluster {cluster.name}: load balancer {name!r} is not one of "
                         f"{sorted(BALANCERS)}") from None
    return factory(cluster, hosts, rng)
