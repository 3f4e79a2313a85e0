"""What a sidecar does for its pod besides proxying: health port, DNS, inbound-only drain.

* **Health** (default 0.0.0.0:15021, never captured by ``pod-init``): ``/healthz/ready`` is 200
  once the proxy is ready (config loaded, listeners bound) and 503 while draining;
  ``/app-health/<name>/<livez|readyz|startupz>`` runs the application's own probe (Istio's probe
  rewrite: the ``--app-probers`` JSON has the shape of ``ISTIO_KUBE_APP_PROBERS``:
  ``{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080}, "timeoutSeconds": 1}}``
  or ``{"tcpSocket": {"port": 8080}}``) against 127.0.0.1, so a prober outside the pod keeps working
  when inbound traffic needs mTLS; ``/stats/prometheus`` serves the proxy's metrics.
* **DNS** (:mod:`.dns`) when ``dns_listen`` is set.
* **SIGUSR2**: stop accepting inbound connections (the capture listener ``virtualInbound``), keep
  serving outbound: what the supervisor (:mod:`.lifecycle`, ``meshproxy run ... -- CMD``) sends
  while the application shuts down, so none of its outbound calls fails.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..bootstrap import Worker

log = logging.getLogger("meshproxy.pod")


@dataclass
class PodOptions:
    health_listen: tuple[str, int] | None = ("0.0.0.0", 15021)
    dns_listen: tuple[str, int] | None = None
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    app_probers: dict = field(default_factory=dict)


def parse_app_probers(text: str) -> dict:
    """``--app-probers`` JSON -> {path: (kind, port, path, timeout)}; ValueError names the bad entry."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--app-probers: not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError("--app-probers: expected an object {\"/app-health/NAME/readyz\": {...}}")
    probers = {}
    for path, spec in raw.items():
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "app-health" or parts[2] not in ("livez", "readyz", "startupz"):
            raise ValueError(f"--app-probers: {path!r}: expected /app-health/NAME/livez|readyz|startupz")
        if not isinstance(spec, dict):
            raise ValueError(f"--app-probers: {path}: expected an object")
        timeout = float(spec.get("timeoutSeconds", 1))
        if isinstance(spec.get("httpGet"), dict):
            get = spec["httpGet"]
            port = get.get("port")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"--app-probers: {path}.httpGet.port: must be a port number, got {port!r}")
            probers[path] = ("http", port, str(get.get("path") or "/"), timeout)
        elif isinstance(spec.get("tcpSocket"), dict):
            port = spec["tcpSocket"].get("port")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"--app-probers: {path}.tcpSocket.port: must be a port number, got {port!r}")
            probers[path] = ("tcp", port, "", timeout)
        else:
            raise ValueError(f"--app-probers: {path}: needs httpGet or tcpSocket")
    return probers


async def run_probe(kind: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """The application's probe against 127.0.0.1: (status to answer, body)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                if kind == "tcp":
                    return 200, b"ok\n"
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: meshproxy-prober\r\n"
                             f"Connection: close\r\n\r\n".encode("latin-1"))
                await writer.drain()
                line = await reader.readline()
                parts = line.split()
                status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
            finally:
                writer.close()
    except (OSError, asyncio.TimeoutError, ValueError) as err:
        return 503, f"probe failed: {err}\n".encode()
    # kubelet semantics: 200-399 is success
    return (200, b"ok\n") if 200 <= status < 400 else (503, f"probe answered {status}\n".encode())


class HealthServer:
    def __init__(self, worker: "Worker", admin_source, probers: dict, host: str, port: int):
        self.worker = worker
        self.admin_source = admin_source
        self.probers = probers
        self.host = host
        self.port = port
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = await self._dispatch(method, urlsplit(target).path)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}.get(status, "")
        try:
            writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         f"connection: close\r\n\r\n".encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), 10.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz/ready":
            ok = self.worker.ready
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path.startswith("/app-health/"):
            prober = self.probers.get(path)
            if prober is None:
                return 404, "text/plain", f"no prober for {path}\n".encode()
            status, body = await run_probe(*prober)
            return status, "text/plain", body
        if path in ("/stats/prometheus", "/metrics"):
            body, ctype = await self.admin_source.metrics("")
            return 200, ctype, body
        return 404, "text/plain", b"not found\n"


class PodServices:
    """Health port and DNS around one worker (``process.serve_worker``), and SIGUSR2."""

    def __init__(self, options: PodOptions, worker: "Worker", admin_source, names):
        self.options = options
        self.worker = worker
        self.admin_source = admin_source
        self.names = names
        self.health: HealthServer | None = None
        self.dns = None

    async def start(self) -> None:
        opts = self.options
        if opts.health_listen is not None:
            self.health = HealthServer(self.worker, self.admin_source, opts.app_probers, *opts.health_listen)
            await self.health.start()
        if opts.dns_listen is not None:
            from .dns import DnsResolver, DnsServer, resolv_conf_nameservers
            upstreams = opts.dns_upstreams or resolv_conf_nameservers()
            self.dns = DnsServer(DnsResolver(self.names, upstreams), *opts.dns_listen)
            await self.dns.start()

    def install_signals(self, loop) -> None:
        loop.add_signal_handler(signal.SIGUSR2, self.drain_inbound)

    def drain_inbound(self) -> None:
        log.info("SIGUSR2: inbound stops accepting; outbound keeps serving")
        for capture in self.worker.capture_listeners.values():
            if not capture.outbound:
                capture.drain()

    async def close(self) -> None:
        if self.health is not None:
            await self.health.close()
        if self.dns is not None:
            await self.dns.close()


def mesh_names(worker: "Worker"):
    """The DNS table of the worker's current snapshot (the outbound capture listener's)."""
    snapshot = worker.snapshot
    if snapshot is not None:
        for listener in snapshot.listeners:
            if listener.protocol == "CAPTURE_OUTBOUND":
                return listener.capture.names
    return {}
