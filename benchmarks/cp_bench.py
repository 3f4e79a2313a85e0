"""Control-plane benchmarks.

  .venv/bin/python benchmarks/cp_bench.py propagation [--proxies 1000] [--rounds 5]
        [--services 10000 --sidecar-hosts 20] [--change resource|endpoint]
  .venv/bin/python benchmarks/cp_bench.py scale [--services 10000] [--endpoints 3] [--sidecar-hosts 20]
  .venv/bin/python benchmarks/cp_bench.py latency [--services 10000] [--source controlplane|file]

propagation: a real `meshctl serve` process (SQLite) and, in a separate process, N
simulated proxies, each a real RemoteConfigClient holding its own HTTP stream and ACKing
every config (the callback returns [] at once: this measures the control plane and the
transport, not the proxy's compile).  Each round applies a VirtualService change and
measures, per proxy, the time from `apply` returning to that proxy's ACK being accepted
(both processes read CLOCK_MONOTONIC).  Reports p50/p99/max of every ACK and the
control plane's CPU time and RSS.

scale: N services x M registered endpoints in one control plane (in process, SQLite on
tmpfs) and one proxy (the real push client, builder and worker runtime, no sockets): for the
first full push, one endpoint change and one resource change, the message size, the control
plane's CPU for the push, the proxy's CPU on its event loop and in its build thread, and
what the previous path (whole payload parsed, decoded and compiled on the loop) costs on the
same data.  CPU times, so the numbers hold on a busy machine.

latency: a real proxy process with N services (from a file, or from a real control plane
with N x 3 registered endpoints), one keep-alive client sending requests one after another
to the one real service, and alternating resource and endpoint changes during the run;
reports time to ready, RSS, and the largest latency within 3 s of each change against the
run's p99 outside those windows.  Wall-clock numbers: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.cli import Client  # noqa: E402
from controlplane.testing import ControlPlaneProcess  # noqa: E402

VS_PATH = "/apis/networking.istio.io/v1/namespaces/default/virtualservices"


def vs(weight: int) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "demo"},
            "spec": {"hosts": ["demo"], "http": [{"route": [
                {"destination": {"host": "demo", "subset": "v1"}, "weight": weight},
                {"destination": {"host": "demo", "subset": "v2"}, "weight": 100 - weight}]}]}}


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cpu, rss * 1024


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------- simulated proxies (child process)


async def simulate(url: str, count: int) -> None:
    """N RemoteConfigClients; on 'report' (stdin) print {node: [version, ack_monotonic]}."""
    from meshproxy.config.remote import RemoteConfigClient
    from meshproxy.config import remote as remote_module

    acked: dict[str, tuple[str, float]] = {}
    clients = []
    for i in range(count):
        node = f"sim-{i}"
        client = RemoteConfigClient([url], node, {"namespace": "default", "labels": {"app": "sim"}},
                                    lambda r, w, v: [], None, read_timeout=120.0, connect_timeout=30.0)
        clients.append(client)

    original = remote_module.KeepAliveChannel.post

    async def timed_post(channel, path, body, timeout):
        status = await original(channel, path, body, timeout)
        if path == "/push/v1/ack" and not body["errors"]:
            acked[body["node_id"]] = (body["version"], time.monotonic())
        return status

    remote_module.KeepAliveChannel.post = timed_post
    tasks = [asyncio.create_task(c.run()) for c in clients]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"report":
            connected = sum(1 for c in clients if c.status.connected)
            sys.stdout.write(json.dumps({"connected": connected, "acked": acked}) + "\n")
            sys.stdout.flush()
    for t in tasks:
        t.cancel()


class Simulator:
    def __init__(self, url: str, count: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "_simulate", url, str(count)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def report(self) -> dict:
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _prefill(db: str, services: int, sidecar_hosts: int) -> None:
    """N services x 3 endpoints (and one canary in 100) in the store before the control plane starts."""
    async def fill():
        from controlplane.store_sqlite import SqliteStore
        store = SqliteStore(db)
        await store.start()
        for s in range(services):
            for e in range(3):
                await store.register(_workload(s, e), 36000)
        for s in range(0, services, 100):
            for obj in _canary(s):
                await store.put(obj)
        if sidecar_hosts:
            await store.put({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
                             "metadata": {"name": "default", "namespace": "default"},
                             "spec": {"egress": [{"hosts": ["./demo"] + [f"./svc{s}" for s in range(sidecar_hosts)]}]}})
        await store.close()
    asyncio.run(fill())


def propagation(proxies: int, rounds: int, services: int = 0, sidecar_hosts: int = 0,
                change: str = "resource") -> dict:
    """``change``: "resource" (the demo VirtualService's weights) or "endpoint" (a pod of svc0,
    or of demo without --services, replaced)."""
    tmp = tempfile.mkdtemp(prefix="cp-bench-")
    if services:
        _prefill(f"{tmp}/cp.db", services, sidecar_hosts)
    cp = ControlPlaneProcess(f"sqlite:{tmp}/cp.db", ttl=36000).start(timeout=120)
    api = Client(cp.url)
    api.call("PUT", f"{VS_PATH}/demo", vs(100))
    sim = Simulator(cp.url, proxies)
    results = []
    try:
        deadline = time.monotonic() + 120
        while True:
            rep = sim.report()
            if len(rep["acked"]) == proxies or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"{rep['connected']} proxies connected, {len(rep['acked'])} ACKed the initial config", flush=True)
        cpu0, rss0 = proc_cpu_rss(cp.proc.pid)
        for r in range(rounds):
            weight = 90 - 10 * r
            if change == "resource":
                code, _ = api.call("PUT", f"{VS_PATH}/demo", vs(weight))
            else:
                code, _ = api.call("POST", "/registry/v1/workloads",
                                   {**_workload(0, r, generation=1), "service": "svc0" if services else "demo",
                                    "ttl": 36000})
            applied = time.monotonic()
            assert code in (200, 201), code
            target = None
            while True:
                time.sleep(0.05)
                rep = sim.report()
                versions = {v for v, _ in rep["acked"].values()}
                latest = [t for v, t in rep["acked"].values() if t >= applied]
                if len(latest) == proxies and len(versions) == 1:
                    target = versions.pop()
                    break
                if time.monotonic() - applied > 60:
                    raise TimeoutError(f"round {r}: only {len(latest)} of {proxies} ACKed within 60 s")
            lat = [t - applied for _, t in rep["acked"].values()]
            results.append(lat)
            print(f"round {r}: {change} change, version {target}: p50 {1000 * pct(lat, 50):.0f} ms  "
                  f"p99 {1000 * pct(lat, 99):.0f} ms  last {1000 * max(lat):.0f} ms", flush=True)
            time.sleep(0.3)
        cpu1, rss1 = proc_cpu_rss(cp.proc.pid)
    finally:
        sim.close()
        cp.stop()
    every = [x for lat in results for x in lat]
    lasts = [max(lat) for lat in results]
    return {"proxies": proxies, "rounds": rounds, "services": services, "sidecar_egress_hosts": sidecar_hosts,
            "change": change, "p50_ms": 1000 * pct(every, 50), "p99_ms": 1000 * pct(every, 99),
            "last_ack_ms_median_over_rounds": 1000 * statistics.median(lasts),
            "cp_cpu_seconds_per_round": (cpu1 - cpu0) / rounds, "cp_rss_mb": rss1 / 2**20,
            "debounce_ms": 100, "leading_edge": True}


# ---------------------------------------------------------------- scale (in process)


def _canary(s: int, weight: int = 90) -> list[dict]:
    return [{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
             "metadata": {"name": f"svc{s}", "namespace": "default"},
             "spec": {"host": f"svc{s}", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                      {"name": "v2", "labels": {"version": "v2"}}]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
             "metadata": {"name": f"svc{s}", "namespace": "default"},
             "spec": {"hosts": [f"svc{s}"], "http": [{"route": [
                 {"destination": {"host": f"svc{s}", "subset": "v1"}, "weight": weight},
                 {"destination": {"host": f"svc{s}", "subset": "v2"}, "weight": 100 - weight}]}]}}]


def _workload(s: int, e: int, generation: int = 0) -> dict:
    return {"id": f"svc{s}-{e}" + (f"-g{generation}" if generation else ""), "service": f"svc{s}",
            "namespace": "default", "address": f"10.{s // 250 % 256}.{s % 250}.{e + 1 + 10 * generation}",
            "ports": {"http": 8080}, "labels": {"app": f"svc{s}", "version": "v1" if e else "v2"}}


class _Acks:
    async def post(self, path, body, timeout):
        return 200


async def scale(services: int, endpoints: int, sidecar_hosts: int = 0) -> dict:
    """Control plane and one proxy, in process, for one full push, one endpoint change and one
    resource change.  Times are CPU seconds of the thread that does the work (load-independent
    up to cache effects); "before" is what the proxy's event loop did per push before the
    incremental path (parse + decode + compile of the whole payload), measured in the same run."""
    from controlplane.push import PushEngine
    from controlplane.store_sqlite import SqliteStore
    from meshproxy.bootstrap import Worker, WorkerOptions
    from meshproxy.config.compile import ProxyIdentity, compile_snapshot
    from meshproxy.config.decode import decode_documents
    from meshproxy.config.incremental import ConfigBuilder
    from meshproxy.config.model import ProxySettings
    from meshproxy.config.remote import LARGE_MESSAGE, RemoteConfigClient
    from meshproxy.config.remote_source import PushedConfig, workload_endpoint
    from meshproxy.config.resources import Document
    from meshproxy.config.store import SnapshotStore
    from meshproxy.process import RunOptions, build_telemetry

    rss_start = proc_cpu_rss(os.getpid())[1]
    tmp = tempfile.mkdtemp(prefix="cp-scale-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    store = SqliteStore(f"{tmp}/cp.db")
    await store.start()
    engine = PushEngine(store)     # not started: the bench recomputes by hand, nothing runs beside it
    t0 = time.perf_counter()
    for s in range(services):
        for e in range(endpoints):
            await store.register(_workload(s, e), 3600)
    for s in range(0, services, 100):            # a canary VirtualService + DestinationRule for one service in 100
        for obj in _canary(s):
            await store.put(obj)
    if sidecar_hosts:     # the proxy's namespace declares what it talks to
        await store.put({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
                         "metadata": {"name": "default", "namespace": "default"},
                         "spec": {"egress": [{"hosts": [f"./svc{s}" for s in range(0, 100 * sidecar_hosts, 100)]}]}})
    fill = time.perf_counter() - t0
    if store._sweeper is not None:    # the store's TTL sweep would run on the loop being timed
        store._sweeper.cancel()
        await asyncio.gather(store._sweeper, return_exceptions=True)
        store._sweeper = None
    proxy = engine.connect("one", {"namespace": "default", "labels": {"app": "svc1"}})
    cpu = time.process_time()
    engine._recompute(time.monotonic())
    push_compute = time.process_time() - cpu
    full_message = engine._message_for(proxy)
    rss_cp = proc_cpu_rss(os.getpid())[1]

    # the proxy: a real client, the real builder and a real worker runtime (no listeners)
    loop = asyncio.get_running_loop()
    identity = ProxyIdentity(namespace="default", labels={"app": "svc1"})
    snapshots = SnapshotStore()
    pushed = PushedConfig(ConfigBuilder(identity), snapshots)
    build_cpu: list[float] = []
    inner = pushed._build

    def timed_build(*args):
        started = time.thread_time()
        try:
            return inner(*args)
        finally:
            build_cpu.append(time.thread_time() - started)

    pushed._build = timed_build
    client = RemoteConfigClient(["http://127.0.0.1:1"], "one", {}, pushed.apply)
    client._acks = _Acks()
    worker = None

    async def receive(message: bytes) -> dict:
        """What the proxy's loop does for one message: its CPU time on the loop thread."""
        started = time.thread_time()
        parsed = json.loads(message) if len(message) < LARGE_MESSAGE else await asyncio.to_thread(json.loads, message)
        await client._handle("bench", parsed)
        loop_cpu = time.thread_time() - started
        engine.acknowledge("one", parsed["nonce"], parsed["version"], [])
        return {"loop_ms": 1000 * loop_cpu, "build_ms": 1000 * build_cpu[-1], "path": pushed.last.path,
                "changed_clusters": pushed.last.changed_clusters, "message_bytes": len(message)}

    rss_before_proxy = proc_cpu_rss(os.getpid())[1]
    first = await receive(full_message)
    rss_after_proxy = proc_cpu_rss(os.getpid())[1]
    worker = Worker(loop, snapshots, WorkerOptions(), build_telemetry(RunOptions(), loop))
    worker.runtime.install(snapshots.current)      # what start() does, without binding listeners

    def before(message: bytes) -> float:
        """The previous proxy path, whole payload on the loop: parse, decode, compile (CPU ms)."""
        started = time.thread_time()
        payload = json.loads(message)
        items = [u["item"] for u in payload["resources"]["updated"]] if payload.get("resources") else []
        decoded = decode_documents([Document("controlplane", i, b) for i, b in enumerate(items)])
        workloads = [workload_endpoint(u["item"]) for u in payload["workloads"]["updated"]]
        compile_snapshot(decoded.resources, identity, ProxySettings(), workloads=workloads, version=payload["version"])
        return 1000 * (time.thread_time() - started)

    before_full_ms = before(full_message)

    # one endpoint change: a pod of svc1 replaced (one deregistration, one registration)
    await store.deregister("svc1-1")
    await store.register(_workload(1, 1, generation=1), 3600)
    cpu = time.process_time()
    engine._recompute(time.monotonic())
    endpoint_push_cpu = time.process_time() - cpu
    endpoint = await receive(engine._message_for(proxy))
    endpoint["cp_push_cpu_ms"] = 1000 * endpoint_push_cpu
    endpoint["before_message_bytes"] = len(proxy.target.workloads.full())   # the old protocol resent the list

    # one resource change: a VirtualService's weights
    await store.put(_canary(0, weight=50)[1])
    cpu = time.process_time()
    engine._recompute(time.monotonic())
    resource_push_cpu = time.process_time() - cpu
    resource = await receive(engine._message_for(proxy))
    resource["cp_push_cpu_ms"] = 1000 * resource_push_cpu
    resource["before_message_bytes"] = len(proxy.target.resources.full())

    await engine.close()
    await store.close()
    return {"services": services, "endpoints_per_service": endpoints, "sidecar_egress_hosts": sidecar_hosts,
            "virtualservices": len(range(0, services, 100)), "fill_seconds": fill,
            "cp_rss_mb": rss_cp / 2**20, "cp_rss_growth_mb": (rss_cp - rss_start) / 2**20,
            "cp_full_push_cpu_ms": 1000 * push_compute,
            "full": {**first, "before_loop_ms": before_full_ms},
            "proxy_rss_growth_mb": (rss_after_proxy - rss_before_proxy) / 2**20,
            "endpoint_change": endpoint, "resource_change": resource,
            "proxy_clusters": len(snapshots.current.clusters),
            "peak_rss_mb": resource_module().getrusage(resource_module().RUSAGE_SELF).ru_maxrss / 1024}


def resource_module():
    return resource


# ---------------------------------------------------------------- latency under config change (real processes)

UPSTREAM = """
import asyncio, sys
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d):
        for _ in range(d.count(b"\\r\\n\\r\\n")):
            self.t.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok")
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(10**9)
asyncio.run(main())
"""

CLIENT = """
import json, socket, sys, time
port, seconds, host = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
request = ("GET / HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % host).encode()
sock = socket.create_connection(("127.0.0.1", port))
out, failed, end = [], 0, time.monotonic() + seconds
buffer = b""
while time.monotonic() < end:
    start = time.monotonic()
    sock.sendall(request)
    while b"\\r\\n\\r\\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed by the proxy")
        buffer += chunk
    head, _, buffer = buffer.partition(b"\\r\\n\\r\\n")
    length = next((int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length:")), 0)
    while len(buffer) < length:
        buffer += sock.recv(65536)
    buffer = buffer[length:]
    out.append((start, time.monotonic() - start))
    failed += not head.startswith(b"HTTP/1.1 200")
    time.sleep(0.001)
print(json.dumps({"samples": out, "failed": failed}))
"""


def _wait_ready(admin_port: int, timeout: float) -> float:
    import urllib.request
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"proxy not ready within {timeout:.0f} s")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_entries(services: int, target_port: int, generation: int = 0) -> str:
    import yaml
    docs = []
    for s in range(services):
        address, port = (("127.0.0.1", target_port) if s == 0 else (f"10.{s // 250 % 256}.{s % 250}.1", 8080))
        docs.append({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                     "metadata": {"name": f"svc{s}", "namespace": "default"},
                     "spec": {"hosts": [f"svc{s}.default.svc.cluster.local"], "location": "MESH_INTERNAL",
                              "resolution": "STATIC", "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                              "endpoints": [{"address": address, "ports": {"http": port}}]}})
    for s in range(0, services, 100):
        docs.append({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                     "metadata": {"name": f"svc{s}", "namespace": "default"},
                     "spec": {"hosts": [f"svc{s}.default.svc.cluster.local"], "http": [
                         {"timeout": f"{5 + generation}s",
                          "route": [{"destination": {"host": f"svc{s}.default.svc.cluster.local"}}]}]}})
    return yaml.safe_dump_all(docs)


def latency(services: int, source: str, seconds: float, changes: int) -> dict:
    """A real proxy with N services (from a file or the control plane), one keep-alive client
    sending requests one after another (1 ms apart) to the one real service, and config
    changes during the run: the largest latency within 3 s after each change against the
    p99 and max of the same run outside those windows.  Wall-clock: run on a quiet machine."""
    import asyncio as _asyncio
    tmp = tempfile.mkdtemp(prefix="cp-latency-")
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    target_port = int(upstream.stdout.readline())
    listen, admin = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "meshproxy", "run", "--listen", f"127.0.0.1:{listen}",
           "--admin", f"127.0.0.1:{admin}", "--log-level", "ERROR"]
    cp = None
    config = Path(tmp) / "config.yaml"
    if source == "file":
        config.write_text(_service_entries(services, target_port))
        cmd += ["--config", str(config)]
    else:
        async def fill():
            from controlplane.store_sqlite import SqliteStore
            store = SqliteStore(f"{tmp}/cp.db")
            await store.start()
            for version in ("v1", "v2"):       # svc0's canary routes to both subsets
                await store.register({"id": f"target-{version}", "service": "svc0", "namespace": "default",
                                      "address": "127.0.0.1", "ports": {"http": target_port},
                                      "labels": {"app": "svc0", "version": version}}, 36000)
            for s in range(1, services):
                for e in range(3):
                    await store.register(_workload(s, e), 36000)
            for s in range(0, services, 100):
                for obj in _canary(s):
                    await store.put(obj)
            await store.close()
        _asyncio.run(fill())
        cp = ControlPlaneProcess(f"sqlite:{tmp}/cp.db", ttl=36000).start(timeout=120)
        cmd += ["--control-plane", cp.url, "--node-id", "bench"]
    proxy = subprocess.Popen(cmd, cwd=str(Path(__file__).resolve().parents[1]))
    result: dict = {"services": services, "source": source}
    try:
        result["startup_to_ready_s"] = _wait_ready(admin, 300)
        result["proxy_rss_mb"] = proc_cpu_rss(proxy.pid)[1] / 2**20
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(listen), str(seconds), "svc0"],
                                  stdout=subprocess.PIPE, text=True)
        api = Client(cp.url) if cp else None
        marks = []
        time.sleep(2.0)
        for i in range(changes):
            kind = "resource" if i % 2 == 0 else "endpoint"
            marks.append((kind, time.monotonic()))
            if source == "file":
                if kind == "resource":
                    config.write_text(_service_entries(services, target_port, generation=i + 1))
                else:          # a file has no registry: an endpoint change is a ServiceEntry endpoint edit
                    text = config.read_text().replace("address: 10.0.5.1", f"address: 10.0.5.{i + 2}", 1)
                    config.write_text(text)
            elif kind == "resource":
                api.call("PUT", f"{VS_PATH}/svc100", {**_canary(100, weight=80 - i)[1],
                                                      "metadata": {"name": "svc100", "namespace": "default"}})
            else:
                api.call("POST", "/registry/v1/workloads", {**_workload(5, 0, generation=i), "ttl": 36000})
            time.sleep(max(3.5, (seconds - 4) / max(changes, 1)))
        report = json.loads(client.communicate(timeout=seconds + 60)[0])
        samples, result["failed_requests"] = report["samples"], report["failed"]
        if api is not None:       # did the proxy follow every change? (ACKed the latest version)
            time.sleep(1.0)
            node = next(p for p in api.call("GET", "/push/v1/proxies")[1]["items"] if p["node_id"] == "bench")
            result["proxy_in_sync"] = node["state"] == "acked" and node["acked_version"] == node["sent_version"]
    finally:
        proxy.terminate()
        proxy.wait(30)
        upstream.kill()
        if cp:
            cp.stop()
    windows = [(k, t, t + 3.0) for k, t in marks]     # the file watcher polls every second
    inside = {k: [] for k, _ in marks}
    outside = []
    for at, lat in samples:
        hit = next((k for k, a, b in windows if a <= at < b), None)
        (inside[hit] if hit else outside).append(lat)
    base_p99 = pct(outside, 99) if outside else 0.0
    result.update({"requests": len(samples), "baseline_p50_ms": 1000 * pct(outside, 50),
                   "baseline_p99_ms": 1000 * base_p99, "baseline_max_ms": 1000 * max(outside),
                   **{f"{k}_change_max_ms": 1000 * max(v) for k, v in inside.items() if v},
                   **{f"{k}_change_added_ms": 1000 * (max(v) - base_p99) for k, v in inside.items() if v}})
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_simulate":
        try:
            import uvloop
            uvloop.run(simulate(sys.argv[2], int(sys.argv[3])))
        except ImportError:
            asyncio.run(simulate(sys.argv[2], int(sys.argv[3])))
        return 0
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("propagation")
    p.add_argument("--proxies", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--services", type=int, default=0, help="services x 3 endpoints in the store beforehand")
    p.add_argument("--sidecar-hosts", type=int, default=0,
                   help="a Sidecar in the proxies' namespace limiting them to this many services")
    p.add_argument("--change", choices=("resource", "endpoint"), default="resource")
    p = sub.add_parser("scale")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=3)
    p.add_argument("--sidecar-hosts", type=int, default=0,
                   help="add a Sidecar limiting the proxy's namespace to this many services")
    p = sub.add_parser("latency", help="request latency through a real proxy while config changes")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--source", choices=("controlplane", "file"), default="controlplane")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--changes", type=int, default=4, help="alternately a resource and an endpoint change")
    args = parser.parse_args()
    if args.what == "propagation":
        result = propagation(args.proxies, args.rounds, args.services, args.sidecar_hosts, args.change)
    elif args.what == "latency":
        result = latency(args.services, args.source, args.seconds, args.changes)
    else:
        result = asyncio.run(scale(args.services, args.endpoints, args.sidecar_hosts))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
