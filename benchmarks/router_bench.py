"""Route lookup cost: select_virtual_host + select_route + split pick, per request.

    .venv/bin/python benchmarks/router_bench.py

Cases: 10 vs 10,000 virtual hosts (target: within 1.2x), and one VirtualService with 10
header/uri match routes in front of a 90/10 split (the request falls through to the last
route).  Also the cluster pick (LEAST_REQUEST) and the sticky split for reference.
"""
from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path
from types import MappingProxyType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshproxy.cluster import ClusterManager  # noqa: E402
from meshproxy.config.model import (Cluster, Endpoint, HeaderMatch, HttpRoute, RouteMatch,  # noqa: E402
                                    RouteTable, Snapshot, StringMatch, VirtualHost, WeightedDestination)
from meshproxy.router.match import select_route, select_virtual_host  # noqa: E402
from meshproxy.router.request import RequestView  # noqa: E402
from meshproxy.router.split import Splitter  # noqa: E402


def dest(host, subset, weight):
    return WeightedDestination(host, subset, 9080, weight, f"outbound|9080|{subset}|{host}")


def table_with(n_hosts: int, routes_for_target):
    exact = {}
    target = None
    for i in range(n_hosts):
        host = f"svc{i}.ns{i % 50}.svc.cluster.local"
        routes = routes_for_target(host) if i == n_hosts // 2 else (
            HttpRoute(name="default", source=f"VirtualService ns/svc{i}: spec.http[0]",
                      destinations=(dest(host, "v1", 100),)),)
        vh = VirtualHost(f"ns/svc{i}", (host,), routes)
        exact[host] = vh
        exact[f"{host}:9080"] = vh
        if i == n_hosts // 2:
            target = host
    table = RouteTable("9080", MappingProxyType(exact),
                       wildcards=((".example.com", VirtualHost("wild", ("*.example.com",), ())),))
    return table, target


def split_routes(host):
    return (HttpRoute(name="canary", source="VirtualService ns/t: spec.http[0]",
                      destinations=(dest(host, "v1", 90), dest(host, "v2", 10))),)


def ten_match_routes(host):
    routes = []
    for i in range(10):
        routes.append(HttpRoute(
            name=f"r{i}", source=f"VirtualService ns/t: spec.http[{i}]",
            matches=(RouteMatch(uri=StringMatch("prefix", f"/api/v{i}/"),
                                headers=(HeaderMatch("x-tenant", StringMatch("exact", f"t{i}")),)),
                     RouteMatch(headers=(HeaderMatch("end-user", StringMatch("regex", f"user{i}-.*",
                                                                              re.compile(f"user{i}-.*"))),))),
            destinations=(dest(host, "v3", 100),)))
    routes.append(HttpRoute(name="canary", source="VirtualService ns/t: spec.http[10]",
                            destinations=(dest(host, "v1", 90), dest(host, "v2", 10))))
    return tuple(routes)


def bench(label: str, table: RouteTable, authority: str, req: RequestView, splitter: Splitter,
          n: int = 200_000, hash_key: bytes | None = None) -> float:
    svh, sr, pick = select_virtual_host, select_route, splitter.pick
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            vh = svh(table, authority)
            route, _m = sr(vh, req)
            pick(route, hash_key)
        best = min(best, (time.perf_counter() - t0) / n)
    print(f"{label:58s} {best * 1e6:6.3f} us/request")
    return best


def main() -> None:
    print(f"python {sys.version.split()[0]}; best of 5 runs")
    headers = {"host": "x", "user-agent": "bench", "accept": "*/*", "end-user": "bob", "x-tenant": "t99"}
    results = {}
    for n_hosts in (10, 10_000):
        table, target = table_with(n_hosts, split_routes)
        snap = Snapshot("1", (), {"9080": table}, {})
        authority = f"{target}:9080"
        req = RequestView("GET", authority, "/reviews/1", "", headers, 9080, "http", "10.0.0.1")
        results[n_hosts] = bench(f"{n_hosts:>6} hosts, 1 route, 90/10 split (SWRR)", table, authority, req,
                                 Splitter(snap))
        # a Host without port and a wildcard host: the slower domain paths
        bench(f"{n_hosts:>6} hosts, authority without port", table, target,
              RequestView("GET", target, "/", "", headers, 9080, "http", ""), Splitter(snap))
    print(f"ratio 10,000 / 10 hosts: {results[10_000] / results[10]:.2f}x (target <= 1.2x)")

    table, target = table_with(10, ten_match_routes)
    snap = Snapshot("1", (), {"9080": table}, {})
    authority = f"{target}:9080"
    req = RequestView("GET", authority, "/reviews/1", "", headers, 9080, "http", "10.0.0.1")
    splitter = Splitter(snap)
    bench("10 match routes (miss) then 90/10 split (SWRR)", table, authority, req, splitter)
    bench("10 match routes (miss) then 90/10 split (sticky key)", table, authority, req, splitter,
          hash_key=b"user-12345")

    # cluster pick for reference
    eps = tuple(Endpoint(f"10.0.{i // 250}.{i % 250}", 9080) for i in range(10))
    manager = ClusterManager(time.monotonic, random.Random(1))
    manager.update(Snapshot("1", (), {}, {"c": Cluster("c", "svc", 9080, None, eps)}))
    state = manager.get("c")
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        host = state.pick_host()
        state.host_started(host)
        state.host_finished(host)
    print(f"{'cluster pick + start/end (LEAST_REQUEST, 10 endpoints)':58s} "
          f"{(time.perf_counter() - t0) / n * 1e6:6.3f} us/request")


if __name__ == "__main__":
    main()
