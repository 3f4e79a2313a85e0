"""Weighted split: smooth WRR without a key, sticky interval split with a key."""
import random
from collections import Counter
from types import MappingProxyType

from meshproxy.config.model import (Cluster, ConsistentHash, Endpoint, HttpRoute, LoadBalancerPolicy,
                                    RouteTable, Snapshot, TrafficPolicy, VirtualHost, WeightedDestination)
from meshproxy.router.request import RequestView
from meshproxy.router.split import Splitter, hash_key_for


def dest(subset, weight):
    return WeightedDestination("reviews.default.svc.cluster.local", subset, 9080, weight,
                               f"outbound|9080|{subset}|reviews.default.svc.cluster.local")


def snapshot_with(*dests, name="r", hashing=True):
    route = HttpRoute(name=name, source="VirtualService default/reviews: spec.http[0]", destinations=tuple(dests))
    vhost = VirtualHost("default/reviews", ("reviews",), (route,))
    lb = LoadBalancerPolicy(consistent_hash=ConsistentHash("header", "x-user")) if hashing else LoadBalancerPolicy()
    clusters = {d.cluster: Cluster(d.cluster, d.host, 9080, d.subset, (Endpoint("10.0.0.1", 9080),),
                                   TrafficPolicy(load_balancer=lb)) for d in dests}
    snap = Snapshot("1", (), {"t": RouteTable("t", MappingProxyType({"reviews": vhost}))}, clusters)
    return snap, route


def test_weights_70_30_0_over_500_picks_are_exact_within_one_and_zero_weight_gets_none():
    snap, route = snapshot_with(dest("v1", 70), dest("v2", 30), dest("v3", 0))
    splitter = Splitter(snap)
    counts = Counter()
    for n in range(1, 501):
        counts[splitter.pick(route, None).subset] += 1
        assert abs(counts["v1"] - n * 0.7) <= 1 and abs(counts["v2"] - n * 0.3) <= 1
    assert counts["v3"] == 0


def test_weights_not_summing_to_100_are_shares_of_their_sum():
    snap, route = snapshot_with(dest("v1", 1), dest("v2", 2))
    splitter = Splitter(snap)
    counts = Counter(splitter.pick(route, None).subset for _ in range(300))
    assert counts == {"v1": 100, "v2": 200}


def test_smooth_round_robin_interleaves_rather_than_bursting():
    snap, route = snapshot_with(dest("v1", 90), dest("v2", 10))
    splitter = Splitter(snap)
    picks = [splitter.pick(route, None).subset for _ in range(100)]
    positions = [i for i, s in enumerate(picks) if s == "v2"]
    assert len(positions) == 10 and all(b - a == 10 for a, b in zip(positions, positions[1:]))


def test_all_zero_weights_or_no_destinations_give_none():
    snap, route = snapshot_with(dest("v1", 0), dest("v2", 0))
    assert Splitter(snap).pick(route, None) is None
    assert Splitter(snap).pick(route, b"key") is None


def test_round_robin_position_survives_a_snapshot_swap_when_the_route_is_unchanged():
    snap, route = snapshot_with(dest("v1", 50), dest("v2", 50))
    first = Splitter(snap)
    assert first.pick(route, None).subset == "v1"
    snap2, route2 = snapshot_with(dest("v1", 50), dest("v2", 50))     # equal, new objects
    second = Splitter(snap2, previous=first)
    assert second.pick(route2, None).subset == "v2"


def test_a_route_from_an_older_snapshot_is_still_served():
    snap, route = snapshot_with(dest("v1", 1))
    other, _ = snapshot_with(dest("v9", 1))
    assert Splitter(other).pick(route, None).subset == "v1"


KEYS = [f"user-{i}".encode() for i in range(10_000)]


def sticky_assignment(snap, route):
    splitter = Splitter(snap)
    return {k: splitter.pick(route, k).subset for k in KEYS}


def test_sticky_split_follows_90_10_within_two_points():
    snap, route = snapshot_with(dest("v1", 90), dest("v2", 10))
    shares = Counter(sticky_assignment(snap, route).values())
    assert abs(shares["v2"] / len(KEYS) - 0.10) < 0.02


def test_sticky_split_gives_a_key_the_same_destination_on_every_pick_and_in_a_fresh_splitter():
    snap, route = snapshot_with(dest("v1", 90), dest("v2", 10))
    splitter = Splitter(snap)
    first = {k: splitter.pick(route, k) for k in KEYS[:500]}
    assert all(splitter.pick(route, k) is first[k] for k in KEYS[:500])
    snap2, route2 = snapshot_with(dest("v1", 90), dest("v2", 10))
    fresh = Splitter(snap2)
    assert all(fresh.pick(route2, k).subset == first[k].subset for k in KEYS[:500])


def test_sticky_split_shift_to_50_50_moves_only_v1_keys_and_about_40_percent():
    before = sticky_assignment(*snapshot_with(dest("v1", 90), dest("v2", 10)))
    after = sticky_assignment(*snapshot_with(dest("v1", 50), dest("v2", 50)))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == "v1" and after[k] == "v2" for k in moved)
    assert abs(len(moved) / len(KEYS) - 0.40) < 0.02


def test_sticky_split_does_not_depend_on_the_order_destinations_are_written():
    a = sticky_assignment(*snapshot_with(dest("v1", 80), dest("v2", 20)))
    b = sticky_assignment(*snapshot_with(dest("v2", 20), dest("v1", 80)))
    assert a == b


def test_hash_policy_comes_from_the_destination_cluster_and_keys_come_from_the_request():
    snap, route = snapshot_with(dest("v1", 90), dest("v2", 10))
    policy = Splitter(snap).hash_policy(route)
    assert policy == ConsistentHash("header", "x-user")
    view = RequestView("GET", "reviews", "/", "u=7", {"x-user": "jason", "cookie": "sid=42"}, 80, "http", "10.0.0.9")
    assert hash_key_for(policy, view) == b"jason"
    assert hash_key_for(ConsistentHash("cookie", "sid"), view) == b"42"
    assert hash_key_for(ConsistentHash("cookie", "sid"), view, cookie_value="new") == b"new"
    assert hash_key_for(ConsistentHash("query", "u"), view) == b"7"
    assert hash_key_for(ConsistentHash("source_ip"), view) == b"10.0.0.9"
    assert hash_key_for(ConsistentHash("header", "absent"), view) is None


def test_no_hash_policy_when_the_destination_does_not_hash():
    snap, route = snapshot_with(dest("v1", 90), dest("v2", 10), hashing=False)
    assert Splitter(snap).hash_policy(route) is None
