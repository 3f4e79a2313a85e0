"""The drop-in sidecar's cost: captured path vs explicit path vs no sidecars, in one run, in pods.

Pods (network namespaces, tests/netns.py; needs root) on one bridge, the control plane in its own
pod, nginx (return 200, keep-alive) as the application:

| path       | client pod                               | server pod                             | hops |
|------------|------------------------------------------|----------------------------------------|------|
| direct     | wrk -> server-plain:9080                 | nginx, no sidecar                      | 0    |
| one-hop    | wrk -> explicit sidecar 127.0.0.1:15101  | server-plain (ServiceEntry plain.bench)| 1    |
| explicit   | wrk -> explicit sidecar (Host: reviews)  | server-meshed: capture sidecar + nginx | 2    |
| captured   | wrk -> reviews VIP:9080, pod-init rules  | server-meshed                          | 2    |

``explicit`` and ``captured`` differ only in how the client's request reaches its sidecar (an
explicit listener vs nftables REDIRECT + SO_ORIGINAL_DST + the capture table): their ratio is what
capture itself costs.  Targets (issue 19): captured >= 0.95x explicit requests/s; the two-hop
mesh adds at most 2x one hop's latency (added p50/p99 over direct).

    sudo .venv/bin/python benchmarks/capture_bench.py                 # ~2 min
    sudo .venv/bin/python benchmarks/capture_bench.py --quick         # plumbing check, meaningless numbers
    sudo .venv/bin/python benchmarks/capture_bench.py --out benchmarks/RESULTS.md

Run it on a quiet machine: every number is a ratio of runs made minutes apart on shared cores.
Throughput: ``wrk -t1 -c50 -d10s`` (median of ``--repeat``), rounds over the paths; latency:
``--rate`` req/s over ``--rate-conns`` h2load connections for 10 s (benchmarks/lib/loadgen.py).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lib import loadgen  # noqa: E402
from meshpods import Mesh  # noqa: E402
from netns import PodNetwork  # noqa: E402

NGINX = """worker_processes 1;
daemon off;
pid {tmp}/nginx-{name}.pid;
error_log {tmp}/nginx-{name}.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-{name}-body;
  proxy_temp_path {tmp}/nginx-{name}-proxy;
  fastcgi_temp_path {tmp}/nginx-{name}-fcgi;
  uwsgi_temp_path {tmp}/nginx-{name}-uwsgi;
  scgi_temp_path {tmp}/nginx-{name}-scgi;
  keepalive_requests 1000000;
  server {{
    listen 9080 backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""

PLAIN_ENTRY = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: plain, namespace: default}}
spec:
  hosts: [plain.bench]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: {address}}}]
"""


def start_nginx(pod, tmp: Path, name: str):
    conf = tmp / f"nginx-{name}.conf"
    conf.write_text(NGINX.format(tmp=tmp, name=name))
    proc = pod.popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pod.wait_port("127.0.0.1", 9080)
    return proc


def wait_ok(pod, url: str, host: str | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url]
    if host:
        argv[1:1] = ["-H", f"Host: {host}"]
    while pod.run(argv).stdout != "200":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} (Host {host}) not answering 200 from {pod}")
        time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--rate", type=int, default=2000, help="fixed request rate for the latency runs")
    p.add_argument("--rate-conns", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="1 s runs, rate 200: checks the plumbing only")
    p.add_argument("--out", help="append the results section to this file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.repeat, args.rate, args.rate_conns = 1.0, 1, 200, 2
    tmp = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    tmp.chmod(0o777)
    with PodNetwork("bench") as net:
        mesh = Mesh(net, tmp)
        plain = net.add_pod("server-plain")
        start_nginx(plain, tmp, "plain")
        mesh.apply(PLAIN_ENTRY.format(address=plain.address))
        server = mesh.add_workload("server-meshed", "reviews", {"app": "reviews", "version": "v1"},
                                   app_ports=["http:9080"], start_sidecar=False)
        start_nginx(server.pod, tmp, "meshed")
        mesh.start_sidecar(server, "reviews", {"app": "reviews", "version": "v1"}, ["http:9080"])
        captured = mesh.add_workload("client-captured", "client", {"app": "client", "version": "v1"},
                                     pod_init=["--capture-dns"])
        explicit_pod = net.add_pod("client-explicit")
        explicit_log = open(tmp / "client-explicit.log", "ab")
        explicit_pod.popen([sys.executable, "-m", "meshproxy", "run", "--control-plane", mesh.url,
                            "--ca-file", str(mesh.root), "--token-file", str(mesh.token_file("default", "client")),
                            "--service-account", "client", "--listen", "127.0.0.1:15101", "--admin", "127.0.0.1:15100", "--namespace", "default"],
                           stdout=explicit_log, stderr=subprocess.STDOUT, env=net.env())
        mesh.wait_endpoints("reviews", 1)
        vip = captured.pod.run(["getent", "hosts", "reviews"]).stdout.split()[0]
        paths = {
            "direct": (explicit_pod, f"http://{plain.address}:9080/", None),
            "one-hop": (explicit_pod, "http://127.0.0.1:15101/", "plain.bench"),
            "explicit": (explicit_pod, "http://127.0.0.1:15101/", "reviews:9080"),
            "captured": (captured.pod, f"http://{vip}:9080/", None),
        }
        for name, (pod, url, host) in paths.items():
            wait_ok(pod, url, host)
        prefix = {name: ["ip", "netns", "exec", pod.netns] for name, (pod, _, _) in paths.items()}
        rps: dict[str, list[float]] = {name: [] for name in paths}
        errors: dict[str, int] = {name: 0 for name in paths}
        for _ in range(args.repeat):
            for name, (pod, url, host) in paths.items():
                res, _ = loadgen.run_wrk(prefix[name], url, conns=args.conns, threads=1,
                                         duration_s=args.duration, host=host)
                rps[name].append(res.rps)
                errors[name] += res.errors
        rate = {}
        for name, (pod, url, host) in paths.items():
            res, _ = loadgen.run_h2load_rate(prefix[name], url, rate=args.rate, conns=args.rate_conns,
                                             duration_s=args.duration, warmup_s=min(2.0, args.duration),
                                             host=host, log_path=str(tmp / f"h2load-{name}"))
            rate[name] = res
    return report(args, rps, errors, rate)


def report(args, rps, errors, rate) -> int:
    med = {name: statistics.median(values) for name, values in rps.items()}
    d50, d99 = rate["direct"].p50_us, rate["direct"].p99_us
    lines = [f"### Drop-in sidecar: captured vs explicit vs no sidecars ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "",
             f"`benchmarks/capture_bench.py` (wrk -t1 -c{args.conns} -d{args.duration:g}s, median of {args.repeat}; "
             f"latency at {args.rate} req/s over {args.rate_conns} h2load connections); pods are network namespaces "
             "on one bridge, nginx return-200 as the application.",
             "",
             "| path | hops | req/s | vs direct | p50 us | p99 us | added p50 | added p99 | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    hops = {"direct": 0, "one-hop": 1, "explicit": 2, "captured": 2}
    for name in rps:
        r = rate[name]
        lines.append(f"| {name} | {hops[name]} | {med[name]:,.0f} | {med[name] / med['direct']:.2f}x | {r.p50_us:.0f} | "
                     f"{r.p99_us:.0f} | {r.p50_us - d50:+.0f} | {r.p99_us - d99:+.0f} | {errors[name] + r.failed} |")
    capture_ratio = med["captured"] / med["explicit"]
    one50, one99 = rate["one-hop"].p50_us - d50, rate["one-hop"].p99_us - d99
    two50, two99 = rate["captured"].p50_us - d50, rate["captured"].p99_us - d99
    lines += ["",
              f"- capture itself: captured / explicit = {capture_ratio:.3f}x requests/s "
              f"(target >= 0.95x: {'met' if capture_ratio >= 0.95 else 'MISSED'})",
              f"- two hops vs one: added p50 {two50:.0f} us vs {one50:.0f} us ({two50 / one50 if one50 > 0 else float('nan'):.2f}x), "
              f"added p99 {two99:.0f} us vs {one99:.0f} us ({two99 / one99 if one99 > 0 else float('nan'):.2f}x) "
              f"(target <= 2x: {'met' if two50 <= 2 * one50 and two99 <= 2 * one99 else 'MISSED'})",
              ""]
    if args.quick:
        lines.insert(1, "\n**--quick: plumbing check only; these numbers mean nothing.**")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
