"""Run a real control-plane process (for tests, the demo and the benchmark).

``ControlPlaneProcess`` starts ``python -m controlplane.cli serve`` on port 0, waits for the
port it bound (``--ready-file``) and stops it with SIGTERM (SIGKILL after a limit), or kills
it outright to simulate a crash.
"""
from __future__ import annotations

import http.client
import os
import signal
import threading
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ControlPlaneProcess:
    def __init__(self, store: str, *, port: int = 0, debounce: float = 0.1, ttl: float = 10.0,
                 extra_env: dict | None = None, log_path: str | None = None, tls: bool = False,
                 extra_args: list[str] | None = None):
        """``tls=False`` runs it with --insecure-loopback (plaintext, no authentication);
        ``tls=True`` serves TLS and writes ``credentials`` (a file path) with an admin token."""
        self.store = store
        self.tls = tls
        self.extra_args = list(extra_args or [])
        self.credentials = ""
        self.port = port
        self.debounce = debounce
        self.ttl = ttl
        self.extra_env = extra_env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def credentials_data(self) -> dict:
        import json
        with open(self.credentials) as f:
            return json.load(f)

    def start(self, timeout: float = 10.0) -> "ControlPlaneProcess":
        workdir = Path(tempfile.mkdtemp(prefix="meshctl-"))
        ready = workdir / "port"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        security = ["--insecure-loopback"]
        if self.tls:
            self.credentials = self.credentials or str(workdir / "credentials.json")
            security = ["--credentials", self.credentials]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--store", self.store,
             "--listen", f"127.0.0.1:{self.port}", "--debounce", str(self.debounce), "--ttl", str(self.ttl),
             "--ready-file", str(ready), *security, *self.extra_args],
            stdout=log, stderr=log, env={**os.environ, **self.extra_env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text():
                self.port = int(ready.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited with {self.proc.returncode} before listening")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"control plane did not listen within {timeout} s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out (closed again; good enough on loopback for tests)."""
    import socket
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class EtcdCluster:
    """A real etcd cluster (Debian's /usr/bin/etcd) on loopback, members started as processes."""

    def __init__(self, data_dir: str, members: int = 3, binary: str = "/usr/bin/etcd"):
        self.data_dir = Path(data_dir)
        self.binary = binary
        ports = free_ports(2 * members)
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def store_spec(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def start(self, timeout: float = 20.0) -> "EtcdCluster":
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        for name, cport, pport in zip(self.names, self.client_ports, self.peer_ports):
            log = open(self.data_dir / f"{name}.log", "ab")
            self.procs[name] = subprocess.Popen(
                [self.binary, "--name", name, "--data-dir", str(self.data_dir / name),
                 "--listen-client-urls", f"http://127.0.0.1:{cport}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                 "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", f"meshproxy-test-{os.getpid()}",
                 "--heartbeat-interval", "50", "--election-timeout", "500"],
                stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        import urllib.request
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.endpoints[0]}/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("etcd cluster did not become healthy")

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        for name in self.procs:
            self.kill(name)


class GatewayLoad:
    """One keep-alive client sending GETs back to back through the gateway; counts outcomes."""

    def __init__(self, port: int):
        self.port = port
        self.outcomes: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/", headers={"host": "demo.example.com"})
                resp = conn.getresponse()
                resp.read()
                key = resp.getheader("x-demo-version") if resp.status == 200 else f"status {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                key = f"error {type(exc).__name__}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            if key not in ("v1", "v2"):
                self.failures.append(f"{time.monotonic():.3f} {key}")
        conn.close()

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def total(self):
        return sum(self.outcomes.values())
