"""Sidecar-to-sidecar mTLS against the same pair in plaintext and against HAProxy
terminating and originating TLS on both legs, in one run (issue 20's benchmark).

    .venv/bin/python benchmarks/mtls_bench.py                      # 20 s per measurement
    .venv/bin/python benchmarks/mtls_bench.py --duration 5 --conns 50 --cores 0,1

Topology, all on loopback, each proxy one process (one worker / one thread):

    wrk -> client proxy -> server proxy -> nginx (small static response)

* ``meshproxy mTLS``: a TLS control plane (``meshctl serve``) issues workload certificates from
  bootstrap tokens; the server sidecar's explicit inbound listener is STRICT, the client
  originates mTLS by auto mTLS (the server registered with its identity).
* ``meshproxy plain``: the same two sidecars without certificates (plaintext between them).
* ``haproxy TLS``: HAProxy A originates TLS with a client certificate, HAProxy B terminates it
  and requires one (``verify required``), with the same kind of certificates (ECDSA P-256).

Three numbers per target: requests/s with keep-alive (wrk ``-c conns``); new connections per
second between the proxies (every request opens a new proxy-to-proxy connection: a full
handshake; DestinationRule ``http.maxRequestsPerConnection: 1`` / HAProxy ``http-reuse never``
with ``option httpclose``); CPU per request of the two proxies together (their /proc CPU time
over the keep-alive run / requests).  Target (issue 20): with keep-alive, meshproxy mTLS at
least 0.7x HAProxy TLS.  Numbers belong in benchmarks/RESULTS.md.  Not part of the test suite;
run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.lib.loadgen import run_wrk  # noqa: E402
from benchmarks.lib.procs import ProcessSet, free_port, pin_prefix, tree_cpu_seconds, wait_port  # noqa: E402
from controlplane.testing import ControlPlaneProcess  # noqa: E402
from mtls import MeshCA  # noqa: E402

PY = sys.executable
HOST = "httpbin.shop"


def nginx(ps: ProcessSet, tmp: Path, port: int):
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "index.html").write_text("ok\n")
    conf = tmp / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        worker_processes 1; daemon off; user root; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err warn;
        events {{ worker_connections 8192; }}
        http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
               server {{ listen 127.0.0.1:{port} backlog=4096; root {tmp}/www; location / {{ }} }} }}
        """))
    m = ps.start("nginx", ["nginx", "-c", str(conf), "-p", str(tmp)], str(tmp / "nginx.log"))
    wait_port(port, proc=m.proc)


def _api(cp, method: str, path: str, body=None) -> dict:
    creds = cp.credentials_data()
    req = urllib.request.Request(cp.url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {creds['token']}"})
    with urllib.request.urlopen(req, timeout=10, context=ssl.create_default_context(cadata=creds["ca"])) as r:
        return json.loads(r.read() or b"{}")


def mesh_pair(ps: ProcessSet, tmp: Path, upstream: int, mtls: bool, per_connection: bool, cores) -> tuple[int, list]:
    """Start a control plane and the two sidecars; return (client port, [client, server] pids)."""
    cp = ControlPlaneProcess(f"sqlite:{tmp / 'cp.db'}", tls=mtls, log_path=str(tmp / "cp.log")).start(timeout=60)
    ps.cp = cp
    policy = ""
    if per_connection:
        policy = textwrap.dedent("""\
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: httpbin, namespace: shop}
            spec:
              host: httpbin.shop.svc.cluster.local
              trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}
            ---
            """)
    if mtls:
        policy += textwrap.dedent("""\
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: default, namespace: shop}
            spec: {mtls: {mode: STRICT}}
            """)
    if policy:
        args = ["--credentials", cp.credentials] if mtls else []
        env = {**os.environ, "MESHCTL_SERVER": cp.url}
        out = subprocess.run([PY, "-m", "controlplane.cli", *args, "apply", "-f", "-"], input=policy, text=True,
                             capture_output=True, cwd=ROOT, env=env, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
    extra_common = []
    if mtls:
        (tmp / "root.pem").write_text("".join(_api(cp, "GET", "/security/v1/ca/roots")["roots"]))
    ports = {}
    pids = []
    for name, sa, extra in (("server", "httpbin", ["--service", "httpbin", "--app-port", f"http:{upstream}",
                                                    "--inbound-port", str(free_port()), "--labels", "app=httpbin"]),
                            ("client", "sleep", [])):
        listen, admin = free_port(), free_port()
        argv = pin_prefix(cores) + [PY, "-m", "meshproxy", "run", "--control-plane", cp.url, "--namespace", "shop",
                                    "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}", *extra]
        if mtls:
            token = _api(cp, "POST", "/security/v1/bootstrap-tokens",
                         {"namespace": "shop", "service_account": sa, "ttl": 3600})["token"]
            (tmp / f"{sa}.token").write_text(token)
            argv += ["--ca-file", str(tmp / "root.pem"), "--token-file", str(tmp / f"{sa}.token"),
                     "--service-account", sa]
        m = ps.start(name, argv + extra_common, str(tmp / f"{name}.log"), cwd=str(ROOT))
        wait_port(admin, proc=m.proc, timeout=60)
        ports[name] = listen
        pids.append(m.proc.pid)
        if name == "server":
            ps.server_admin = admin
    deadline = time.monotonic() + 60
    while True:           # until the client has the server's endpoint and the pair answers
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{ports['client']}/", headers={"Host": HOST})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sidecar pair never answered; see {tmp}")
        time.sleep(0.2)
    return ports["client"], pids


def haproxy_pair(ps: ProcessSet, tmp: Path, upstream: int, per_connection: bool, cores) -> tuple[int, list]:
    ca = MeshCA("bench root")
    server = ca.issue("spiffe://cluster.local/ns/shop/sa/httpbin", dns=("httpbin",))
    client = ca.issue("spiffe://cluster.local/ns/shop/sa/sleep", dns=("sleep",))
    (tmp / "root.pem").write_bytes(ca.root_pem)
    (tmp / "server.pem").write_bytes(server.cert_pem + server.key_pem)
    (tmp / "client.pem").write_bytes(client.cert_pem + client.key_pem)
    a_port, b_port = free_port(), free_port()
    reuse = "never" if per_connection else "always"
    close = "    option httpclose\n" if per_connection else ""
    common = "global\n    nbthread 1\n    maxconn 8000\ndefaults\n    mode http\n    timeout connect 5s\n" \
             "    timeout client 300s\n    timeout server 300s\n    timeout http-keep-alive 300s\n"
    (tmp / "b.cfg").write_text(common + textwrap.dedent(f"""\
        frontend b
            bind 127.0.0.1:{b_port} ssl crt {tmp}/server.pem ca-file {tmp}/root.pem verify required
            default_backend app
        backend app
            http-reuse always
            server app 127.0.0.1:{upstream}
        """))
    (tmp / "a.cfg").write_text(common + textwrap.dedent(f"""\
        frontend a
            bind 127.0.0.1:{a_port}
            default_backend b
        backend b
            http-reuse {reuse}
        {close}    server b 127.0.0.1:{b_port} ssl crt {tmp}/client.pem ca-file {tmp}/root.pem verify required sni str(httpbin)
        """))
    pids = []
    for name in ("b", "a"):
        m = ps.start(f"haproxy-{name}", pin_prefix(cores) + ["haproxy", "-f", str(tmp / f"{name}.cfg")],
                     str(tmp / f"haproxy-{name}.log"))
        wait_port(a_port if name == "a" else b_port, proc=m.proc)
        pids.append(m.proc.pid)
    return a_port, pids


def measure(name: str, start, args, upstream: int) -> dict:
    row = {"target": name}
    for per_connection in (False, True):
        ps = ProcessSet()
        ps.cp = None
        tmp = Path(tempfile.mkdtemp(prefix=f"mtls-bench-{os.getpid()}-"))
        try:
            port, pids = start(ps, tmp, upstream, per_connection, args.proxy_cores)
            url = f"http://127.0.0.1:{port}/"
            run_wrk(pin_prefix(args.wrk_cores), url, conns=args.conns, threads=1, duration_s=1, host=HOST)  # warm
            cpu0 = sum(tree_cpu_seconds(p) for p in pids)
            result, argv = run_wrk(pin_prefix(args.wrk_cores), url, conns=args.conns, threads=1,
                                   duration_s=args.duration, host=HOST)
            cpu = sum(tree_cpu_seconds(p) for p in pids) - cpu0
            if name == "meshproxy mTLS":     # the pair really spoke mTLS: the server says so in Istio's labels
                with urllib.request.urlopen(f"http://127.0.0.1:{ps.server_admin}/metrics", timeout=10) as r:
                    if 'connection_security_policy="mutual_tls"' not in r.read().decode():
                        raise RuntimeError("the server sidecar saw no mutual_tls request")
            if per_connection:
                row["new_connections_per_s"] = round(result.rps)
                row["errors_new_connections"] = result.errors
            else:
                row["keepalive_rps"] = round(result.rps)
                row["cpu_us_per_request"] = round(cpu / max(result.requests, 1) * 1e6, 1)
                row["p99_us"] = result.p99_us
                row["errors_keepalive"] = result.errors
                row["wrk"] = argv
        finally:
            ps.stop_all()
            if ps.cp is not None:
                ps.cp.stop()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--proxy-cores", default="0", help="cores the proxies are pinned to (empty: not pinned)")
    p.add_argument("--wrk-cores", default="1", help="cores wrk is pinned to (empty: not pinned)")
    p.add_argument("--only", default="", help="comma list of: mtls,plain,haproxy")
    args = p.parse_args()
    args.proxy_cores = [int(c) for c in args.proxy_cores.split(",") if c] or None
    args.wrk_cores = [int(c) for c in args.wrk_cores.split(",") if c] or None
    only = set(args.only.split(",")) if args.only else {"mtls", "plain", "haproxy"}
    ups = ProcessSet()
    tmp = Path(tempfile.mkdtemp(prefix=f"mtls-bench-up-{os.getpid()}-"))
    upstream = free_port()
    rows = []
    try:
        nginx(ups, tmp, upstream)
        targets = [("meshproxy mTLS", "mtls", lambda ps, t, u, pc, c: mesh_pair(ps, t, u, True, pc, c)),
                   ("meshproxy plain", "plain", lambda ps, t, u, pc, c: mesh_pair(ps, t, u, False, pc, c)),
                   ("haproxy TLS", "haproxy", haproxy_pair)]
        for title, key, start in targets:
            if key in only:
                rows.append(measure(title, start, args, upstream))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        ups.stop_all()
    by = {r["target"]: r for r in rows}
    if "meshproxy mTLS" in by and "haproxy TLS" in by:
        ratio = by["meshproxy mTLS"]["keepalive_rps"] / max(by["haproxy TLS"]["keepalive_rps"], 1)
        print(f"keep-alive over TLS: meshproxy / HAProxy = {ratio:.2f}x (target >= 0.7x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
