"""Throughput of one bulk TCP transfer through two sidecars, plaintext vs mTLS, on loopback.

    .venv/bin/python benchmarks/tcp_mtls_bench.py                  # 256 MiB, each target once
    .venv/bin/python benchmarks/tcp_mtls_bench.py --size-mib 512 --runs 3

    client -> client sidecar (outbound TCP listener) -> server sidecar (inbound TCP listener) -> sink

Each sidecar is a real worker (``meshproxy.bootstrap.Worker``) on uvloop in its own process,
serving a snapshot: the client's outbound listener routes to a cluster whose endpoint is the
server's inbound listener; ``mtls``: that cluster originates ISTIO_MUTUAL (the TCP path's
half-closing TLS transport) and the inbound listener is STRICT; ``plain``: no TLS, DISABLE.
Workload certificates are ECDSA P-256 from a test CA.  The client and the sink are
benchmarks/tcp_bench.py's (one reused 1 MiB buffer with flow control; the sink answers the
byte count at EOF, so the time includes draining every buffer).  Also printed: the CPU time
the two sidecar processes used per GiB (less sensitive to a busy machine than MB/s).  Not
part of the test suite.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import sys
import tempfile
from types import MappingProxyType

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvloop  # noqa: E402

from lib.procs import cpu_seconds  # noqa: E402
from tcp_bench import run_sink, transfer  # noqa: E402

SERVER_ID = "spiffe://cluster.local/ns/foo/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/foo/sa/client"


def _serve(q, snapshot, issued, directory):
    from meshproxy.bootstrap import Worker, WorkerOptions
    from meshproxy.config.store import SnapshotStore
    from meshproxy.proxy.observe import Telemetry
    from mtls import StaticCertificates

    async def main():
        worker = Worker(asyncio.get_running_loop(), SnapshotStore(snapshot), WorkerOptions(), Telemetry(),
                        rng=random.Random(1))
        if issued is not None:
            worker.certificates = StaticCertificates(issued, directory)
        await worker.start()
        q.put("ready")
        await asyncio.Event().wait()
    uvloop.run(main())


def _snapshots(sink_port: int, inbound_port: int, outbound_port: int, mtls: bool):
    from meshproxy.config.model import (
        Cluster, Endpoint, Listener, Snapshot, TcpRoute, TrafficPolicy, UpstreamTls, WeightedDestination,
    )
    sink = Cluster("inbound|9000||", "", 9000, None, (Endpoint("127.0.0.1", sink_port),), protocol="TCP")
    server = Snapshot("s", listeners=(Listener(
        "inbound_tcp", "127.0.0.1", inbound_port, "TCP", mtls="STRICT" if mtls else "DISABLE",
        tcp_routes=(TcpRoute((WeightedDestination("", None, 9000, 100, sink.name),)),)),),
        route_tables=MappingProxyType({}), clusters=MappingProxyType({sink.name: sink}))
    tls = UpstreamTls("ISTIO_MUTUAL", sni="outbound_.9000_._.server.foo.svc.cluster.local",
                      subject_alt_names=(SERVER_ID,), alpn=("istio-peer-exchange", "istio")) if mtls else None
    upstream = Cluster("outbound|9000||server.foo.svc.cluster.local", "server.foo.svc.cluster.local", 9000, None,
                       (Endpoint("127.0.0.1", inbound_port),), TrafficPolicy(tls=tls), protocol="TCP")
    client = Snapshot("c", listeners=(Listener(
        "outbound_tcp", "127.0.0.1", outbound_port, "TCP",
        tcp_routes=(TcpRoute((WeightedDestination(upstream.service, None, 9000, 100, upstream.name),)),)),),
        route_tables=MappingProxyType({}), clusters=MappingProxyType({upstream.name: upstream}))
    return server, client


def main():
    from helpers import free_port
    from mtls import MeshCA
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    size = args.size_mib << 20
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=run_sink, args=(q,), daemon=True)]
    procs[0].start()
    sink_port = q.get(timeout=10)
    ca = MeshCA()
    directory = tempfile.mkdtemp(prefix="tcp-mtls-bench-")
    targets = [("direct", sink_port, [])]
    for name, mtls in (("plain", False), ("mtls", True)):
        inbound, outbound = free_port(), free_port()
        server, client = _snapshots(sink_port, inbound, outbound, mtls)
        pair = []
        for snap, identity in ((server, SERVER_ID), (client, CLIENT_ID)):
            p = ctx.Process(target=_serve, args=(q, snap, ca.issue(identity) if mtls else None, directory),
                            daemon=True)
            p.start()
            procs.append(p)
            pair.append(p.pid)
            assert q.get(timeout=20) == "ready"
        targets.append((f"two sidecars, {name}", outbound, pair))
    try:
        for run in range(args.runs):
            for name, port, pids in targets:
                cpu = sum(cpu_seconds(pid) for pid in pids)
                elapsed = uvloop.run(transfer(port, size))
                cpu = sum(cpu_seconds(pid) for pid in pids) - cpu
                per_gib = f", sidecars' CPU {cpu / (size / (1 << 30)):5.2f} s/GiB" if pids else ""
                print(f"run {run + 1} {name:22s} {args.size_mib} MiB in {elapsed:6.2f} s = "
                      f"{size / elapsed / 1e6:8.1f} MB/s{per_gib}", flush=True)
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
