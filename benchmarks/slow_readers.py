"""Slow readers against meshproxy and HAProxy 2.6: peak and after-burst RSS (issue 18 §6).

    .venv/bin/python benchmarks/slow_readers.py [--only meshproxy,haproxy] [--length 45]

One upstream (this script in ``--upstream`` mode: every request gets a 1 MiB response) behind
each proxy in turn, with matching timeouts (header 10 s, keep-alive idle 60 s, connect 10 s,
server 60 s).  Then ``slowhttptest -X -c 4000 -r 200 -w 512 -y 1024 -n 5 -z 32 -k 3 -l 45``
(slow read: a small receive window, 32 bytes read every 5 s, three pipelined requests per
connection) against the proxy, while the proxy's RSS is sampled every 0.25 s.  Reported per
target: RSS before, peak RSS during the run, RSS 5 s after slowhttptest ended (the burst's
connections are gone then), and slowhttptest's last status line.  For meshproxy the worker is
the process measured (``--workers 1``: one worker under the master); for HAProxy its one
process (``nbthread 1``).

Needs slowhttptest (Debian ``slowhttptest``) and haproxy on the PATH.  The machine's other load
changes the timing but little the memory; say in the results if the machine was shared.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESPONSE = 1 << 20

HAPROXY_CFG = """global
    maxconn 9000
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 10s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    maxconn 9000
    default_backend be
backend be
    server up 127.0.0.1:{upstream}
"""

MESH_YAML = """apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: big, namespace: default}}
spec:
  hosts: [big.local, 127.0.0.1]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: 127.0.0.1, ports: {{http: {upstream}}}}}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_upstream(port: int) -> None:
    """Answer every request with 1 MiB (keep-alive), written as the peer reads."""
    block = b"y" * RESPONSE
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % RESPONSE

    async def serve(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head)
                writer.write(block)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


def rss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) if m else 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measured_pid(name: str, proc: subprocess.Popen) -> int:
    """meshproxy: its worker (the master's child); HAProxy: its own process."""
    if name == "meshproxy":
        for _ in range(50):
            kids = children(proc.pid)
            if kids:
                return kids[0]
            time.sleep(0.1)
    return proc.pid


def run_target(name: str, upstream: int, tmp: Path, args) -> dict:
    port = free_port()
    if name == "haproxy":
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, upstream=upstream))
        proc = start(["haproxy", "-db", "-f", str(cfg)], tmp / "haproxy.log")
        url = f"http://127.0.0.1:{port}/big"
    else:
        cfg_dir = tmp / "mesh"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / "mesh.yaml").write_text(MESH_YAML.format(upstream=upstream))
        proc = start([sys.executable, "-m", "meshproxy", "run", "--config", str(cfg_dir), "--listen",
                      f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}", "--workers", "1",
                      "--header-timeout", "10", "--idle-timeout", "60", "--connect-timeout", "10",
                      "--max-connections", "9000", "--drain-grace", "0"], tmp / "meshproxy.log")
        url = f"http://127.0.0.1:{port}/big"
    try:
        wait_port(port)
        pid = measured_pid(name, proc)
        # one full exchange first, so both start warm
        subprocess.run(["curl", "-sf", "-o", "/dev/null", url], timeout=20, check=True)
        time.sleep(1)
        before = rss_kb(pid)
        cmd = ["slowhttptest", "-X", "-c", "4000", "-r", "200", "-w", "512", "-y", "1024", "-n", "5",
               "-z", "32", "-k", "3", "-l", str(args.length), "-u", url, "-x", "24", "-p", "3"]
        st = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
        peak = before
        while st.poll() is None:
            peak = max(peak, rss_kb(pid))
            time.sleep(0.25)
        out = st.stdout.read()
        ended = time.monotonic()
        while time.monotonic() - ended < args.after:
            peak = max(peak, rss_kb(pid))
            time.sleep(0.25)
        after = rss_kb(pid)
        out = re.sub(r"\x1b\[[0-9;]*m", "", out)
        status = [" ".join(line.split()) for line in out.splitlines()
                  if "service available" in line or "connected" in line]
        return {"target": name, "before_kb": before, "peak_kb": peak, "after_kb": after,
                "slowhttptest": " | ".join(status[-3:])}
    finally:
        stop(proc)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        serve_upstream(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="meshproxy,haproxy")
    ap.add_argument("--length", type=int, default=45, help="slowhttptest -l (seconds)")
    ap.add_argument("--after", type=float, default=5.0, help="seconds after the run before the after-burst RSS")
    args = ap.parse_args()
    for tool in ("slowhttptest", "haproxy", "curl"):
        if shutil.which(tool) is None:
            print(f"slow_readers: {tool} is not on the PATH", file=sys.stderr)
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))   # inherited by every process
    tmp = Path(tempfile.mkdtemp(prefix="slow-readers-"))
    up_port = free_port()
    upstream = start([sys.executable, __file__, "--upstream", str(up_port)], tmp / "upstream.log")
    results = []
    try:
        wait_port(up_port)
        for name in args.only.split(","):
            results.append(run_target(name, up_port, tmp, args))
            print(results[-1], flush=True)
    finally:
        stop(upstream)
    print()
    print("| target | RSS before (MiB) | peak (MiB) | 5 s after (MiB) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['target']} | {r['before_kb'] / 1024:.1f} | {r['peak_kb'] / 1024:.1f} | {r['after_kb'] / 1024:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
