"""Load balancers, slow start, manager updates (meshproxy.cluster)."""
import random
from collections import Counter

from meshproxy.config.model import (Cluster, ConsistentHash, Endpoint, LoadBalancerPolicy, Snapshot,
                                    TrafficPolicy)
from meshproxy.cluster import ClusterManager, ClusterState
from meshproxy.router.split import split_point


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def endpoints(n, weights=None):
    return tuple(Endpoint(f"10.0.0.{i}", 8080, weight=(weights[i] if weights else 1)) for i in range(n))


def cluster(n=4, simple="ROUND_ROBIN", ch=None, weights=None, warmup=None, name="c", eps=None):
    lb = LoadBalancerPolicy(simple=simple, consistent_hash=ch, warmup=warmup)
    return Cluster(name, "svc.default.svc.cluster.local", 8080, None, eps or endpoints(n, weights),
                   TrafficPolicy(load_balancer=lb))


def state(c, clock=None, seed=1):
    return ClusterState(c, clock or Clock(), random.Random(seed))


def host_of(state, ep):
    """The state's Host record of endpoint ``ep`` (what the proxy keeps from pick_host)."""
    return state.hosts[state.cluster.endpoints.index(ep)]


def addr(ep):
    return ep.address


def test_round_robin_visits_every_endpoint_in_turn():
    s = state(cluster(4))
    counts = Counter(addr(s.pick()) for _ in range(400))
    assert set(counts.values()) == {100}


def test_round_robin_with_weights_follows_the_weights_exactly():
    s = state(cluster(3, weights=[1, 2, 3]))
    counts = Counter(addr(s.pick()) for _ in range(600))
    assert [counts[f"10.0.0.{i}"] for i in range(3)] == [100, 200, 300]


def test_random_spreads_evenly():
    s = state(cluster(4, "RANDOM"))
    counts = Counter(addr(s.pick()) for _ in range(8000))
    assert all(1800 < v < 2200 for v in counts.values())


def test_least_request_spreads_evenly_when_idle():
    s = state(cluster(4, "LEAST_REQUEST"))
    counts = Counter(addr(s.pick()) for _ in range(8000))
    assert all(1800 < v < 2200 for v in counts.values())


def test_least_request_power_of_two_prefers_the_less_loaded_endpoint():
    c = cluster(2, "LEAST_REQUEST")
    s = state(c)
    for _ in range(5):
        s.host_started(host_of(s, c.endpoints[0]))
    assert all(s.pick() is c.endpoints[1] for _ in range(50))
    for _ in range(5):
        s.host_finished(host_of(s, c.endpoints[0]))
    assert {addr(s.pick()) for _ in range(50)} == {"10.0.0.0", "10.0.0.1"}


def test_least_request_never_picks_the_busiest_of_three_when_others_are_idle():
    c = cluster(3, "LEAST_REQUEST")
    s = state(c)
    for _ in range(10):
        s.host_started(host_of(s, c.endpoints[2]))
    assert "10.0.0.2" not in {addr(s.pick()) for _ in range(200)}


def test_excluded_endpoints_are_skipped_and_nothing_left_gives_none():
    c = cluster(2)
    s = state(c)
    assert all(s.pick(exclude=frozenset({("10.0.0.0", 8080)})) is c.endpoints[1] for _ in range(5))
    assert s.pick(exclude=[c.endpoints[0], c.endpoints[1]]) is None


def ring_cluster(n, algorithm="ring"):
    return cluster(n, ch=ConsistentHash("header", "x-user", algorithm=algorithm))


KEYS = [f"user-{i}".encode() for i in range(4000)]


def test_ring_hash_same_key_same_endpoint_and_keys_spread():
    s = state(ring_cluster(4))
    first = {k: s.pick(k) for k in KEYS}
    assert all(s.pick(k) is first[k] for k in KEYS[:200])
    counts = Counter(addr(e) for e in first.values())
    assert all(600 < v < 1400 for v in counts.values())


def test_ring_hash_removing_an_endpoint_moves_only_its_keys():
    before = state(ring_cluster(5))
    after = state(cluster(4, ch=ConsistentHash("header", "x-user"), eps=endpoints(5)[:4]))
    a = {k: addr(before.pick(k)) for k in KEYS}
    b = {k: addr(after.pick(k)) for k in KEYS}
    moved = [k for k in KEYS if a[k] != b[k]]
    assert moved and all(a[k] == "10.0.0.4" for k in moved)
    assert len(moved) == sum(1 for v in a.values() if v == "10.0.0.4")


def test_ring_hash_skips_an_excluded_endpoint_without_moving_other_keys():
    c = ring_cluster(4)
    s = state(c)
    base = {k: addr(s.pick(k)) for k in KEYS}
    skip = frozenset({("10.0.0.1", 8080)})
    other = {k: addr(s.pick(k, skip)) for k in KEYS}
    assert all(other[k] == base[k] for k in KEYS if base[k] != "10.0.0.1")
    assert "10.0.0.1" not in other.values()


def test_maglev_is_sticky_balanced_and_mostly_stable_on_removal():
    five = state(ring_cluster(5, "maglev"))
    four = state(cluster(4, ch=ConsistentHash("header", "x-user", algorithm="maglev"), eps=endpoints(5)[:4]))
    a = {k: addr(five.pick(k)) for k in KEYS}
    assert all(addr(five.pick(k)) == a[k] for k in KEYS[:200])
    assert all(600 < v < 1000 for v in Counter(a.values()).values())
    b = {k: addr(four.pick(k)) for k in KEYS}
    stayed = [k for k in KEYS if a[k] != "10.0.0.4"]
    assert sum(a[k] == b[k] for k in stayed) / len(stayed) > 0.9


def test_version_split_and_endpoint_ring_are_independent():
    # keys the sticky split sends to the 10 % canary must still spread over its endpoints
    canary_keys = [k for k in (f"u{i}".encode() for i in range(20000)) if split_point(k) >= 0.9]
    s = state(ring_cluster(4))
    counts = Counter(addr(s.pick(k)) for k in canary_keys)
    assert len(counts) == 4 and min(counts.values()) > len(canary_keys) / 4 * 0.6


def test_passthrough_uses_the_original_destination():
    s = state(cluster(2, "PASSTHROUGH"))
    ep = s.pick(original=("192.168.1.5", 443))
    assert (ep.address, ep.port) == ("192.168.1.5", 443)
    assert s.pick() is None


def test_slow_start_gives_a_new_endpoint_a_linearly_ramping_share():
    clock = Clock()
    manager = ClusterManager(clock, random.Random(3))
    old = cluster(2, warmup=100.0)
    manager.update(Snapshot("1", (), {}, {"c": old}))
    grown = cluster(3, warmup=100.0)
    clock.now += 1
    manager.update(Snapshot("2", (), {}, {"c": grown}))
    s = manager.get("c")

    def new_share():
        counts = Counter(addr(s.pick()) for _ in range(3000))
        return counts["10.0.0.2"] / 3000

    early = new_share()              # 10 % minimum weight: 0.1 / 2.1
    clock.now += 50
    half = new_share()               # 0.5 / 2.5
    clock.now += 60
    full = new_share()               # warm: 1/3
    assert abs(early - 0.1 / 2.1) < 0.01 and abs(half - 0.2) < 0.01 and abs(full - 1 / 3) < 0.01


def test_endpoints_present_at_start_are_not_slow_started():
    s = state(cluster(2, warmup=100.0))
    counts = Counter(addr(s.pick()) for _ in range(100))
    assert set(counts.values()) == {50}


def test_manager_keeps_the_state_of_unchanged_clusters_and_drops_removed_ones():
    manager = ClusterManager(Clock(), random.Random(1))
    a, b = cluster(2, name="a"), cluster(2, name="b")
    manager.update(Snapshot("1", (), {}, {"a": a, "b": b}))
    sa = manager.get("a")
    sa.admit_pending()
    manager.update(Snapshot("2", (), {}, {"a": cluster(2, name="a")}))
    assert manager.get("a") is sa and manager.get("b") is None
    assert sa.stats()["pending_requests"] == 1


def test_changed_cluster_shares_counters_so_old_requests_release_what_they_took():
    manager = ClusterManager(Clock(), random.Random(1))
    manager.update(Snapshot("1", (), {}, {"a": cluster(2, name="a")}))
    old = manager.get("a")
    assert old.admit_connection()
    old.host_started(host_of(old, old.cluster.endpoints[0]))
    manager.update(Snapshot("2", (), {}, {"a": cluster(3, name="a")}))
    new = manager.get("a")
    assert new is not old and new.stats()["connections"] == 1
    assert new.stats()["endpoints"][0]["active_requests"] == 1
    old.release_connection()
    old.host_finished(host_of(old, old.cluster.endpoints[0]))
    assert new.stats()["connections"] == 0 and new.stats()["active_requests"] == 0


def test_the_picked_host_is_released_on_the_state_that_replaced_its_cluster():
    # the proxy keeps the Host an attempt picked; a config change that keeps the endpoint's
    # address and port carries the Host over, so the attempt's end releases the new state's load
    manager = ClusterManager(Clock(), random.Random(1))
    manager.update(Snapshot("1", (), {}, {"a": cluster(2, "LEAST_REQUEST", name="a")}))
    old = manager.get("a")
    host = old.pick_host()
    old.host_started(host)
    moved = tuple(Endpoint(ep.address, ep.port, weight=3) for ep in old.cluster.endpoints)
    manager.update(Snapshot("2", (), {}, {"a": cluster(name="a", simple="LEAST_REQUEST", eps=moved)}))
    new = manager.get("a")
    active = {e["address"]: e["active_requests"] for e in new.stats()["endpoints"]}
    assert new is not old and active[host.endpoint.address] == 1
    old.host_finished(host)
    assert [e["active_requests"] for e in new.stats()["endpoints"]] == [0, 0]
    assert new.stats()["active_requests"] == 0


def test_passthrough_picks_a_host_for_the_original_destination_outside_the_cluster():
    c = Cluster("pt", "svc.default.svc.cluster.local", 8080, None, (),
                TrafficPolicy(load_balancer=LoadBalancerPolicy(simple="PASSTHROUGH")))
    s = state(c)
    host = s.pick_host(original=("10.9.9.9", 7000))
    assert (host.endpoint.address, host.endpoint.port, host.key) == ("10.9.9.9", 7000, ("10.9.9.9", 7000))
    assert s.pick_host() is None and s.pick(original=("10.9.9.9", 7000)).address == "10.9.9.9"
    s.host_started(host)
    s.record_host(host, 503)
    s.host_finished(host)
    assert host.active == 0 and s.stats()["active_requests"] == 0 and s.stats()["endpoints"] == []
