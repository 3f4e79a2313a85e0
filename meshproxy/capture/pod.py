"""What a sidecar does for its pod besides proxying: health port, DNS, and the application's life.

* **Health** (default 0.0.0.0:15021, never captured by ``pod-init``): ``/healthz/ready`` is 200
  once the proxy is ready (config loaded, listeners bound) and 503 while draining;
  ``/app-health/<name>/<livez|readyz|startupz>`` runs the application's own probe (Istio's probe
  rewrite: the ``--app-probers`` JSON has the shape of ``ISTIO_KUBE_APP_PROBERS``:
  ``{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080}, "timeoutSeconds": 1}}``
  or ``{"tcpSocket": {"port": 8080}}``) against 127.0.0.1, so a prober outside the pod keeps working
  when inbound traffic needs mTLS; ``/stats/prometheus`` serves the proxy's metrics.
* **DNS** (:mod:`.dns`) when ``dns_listen`` is set.
* **The application** (``meshproxy run ... -- CMD ARGS``, Istio's ``holdApplicationUntilProxyStarts``):
  CMD starts only once the proxy is ready; SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 sent to the
  sidecar are forwarded to it; when it exits on its own the sidecar drains and exits with its exit
  code.  On SIGTERM the sidecar stops accepting inbound connections at once but keeps serving the
  application's outbound calls until the application has exited (or ``app_exit_timeout``), then
  drains: an application that makes calls during its own shutdown sees none fail.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..bootstrap import Worker

log = logging.getLogger("meshproxy.pod")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class PodOptions:
    health_listen: tuple[str, int] | None = ("0.0.0.0", 15021)
    dns_listen: tuple[str, int] | None = None
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    app_probers: dict = field(default_factory=dict)
    app_command: list[str] = field(default_factory=list)
    app_exit_timeout: float = 30.0       # on SIGTERM: how long outbound keeps serving the exiting app


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


class Application:
    """The pod's application process (``-- CMD ARGS``), started once the sidecar is ready."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self._waiter: asyncio.Task | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=subprocess.DEVNULL)
        self._waiter = asyncio.get_running_loop().create_task(self._wait())
        log.info("application started (pid %d): %s", self.proc.pid, " ".join(self.argv))

    async def _wait(self) -> None:
        code = await self.proc.wait()
        # a process killed by a signal reports -N: exit as a shell would (128 + N)
        self.returncode = code if code >= 0 else 128 - code
        self.exited.set()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float) -> None:
        """SIGTERM was forwarded already; wait for the exit, SIGKILL at the deadline."""
        if self.proc is None:
            return
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("application did not exit within %.1fs: SIGKILL", timeout)
            self.signal(signal.SIGKILL)
            await self.exited.wait()


class PodServices:
    """Health port, DNS and the application, around one worker (``process.serve_worker``)."""

    def __init__(self, options: PodOptions, worker: "Worker", admin_source, names):
        self.options = options
        self.worker = worker
        self.admin_source = admin_source
        self.names = names
        self.health: HealthServer | None = None
        self.dns = None
        self.app: Application | None = Application(options.app_command) if options.app_command else None
        self._exit_watch: asyncio.Task | None = None

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

    def install_signals(self, loop, stop: asyncio.Event) -> bool:
        """With an application: the signals go to it (SIGTERM/SIGINT also start our shutdown).
        False when there is no application (the caller keeps its own handlers)."""
        if self.app is None:
            return False
        app = self.app

        def forward(sig: int) -> None:
            app.signal(sig)
            if sig in (signal.SIGTERM, signal.SIGINT):
                stop.set()

        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, forward, sig)
        return True

    async def start_app(self, stop: asyncio.Event) -> None:
        """Called once the proxy is ready: start the application; its exit stops the sidecar."""
        if self.app is None:
            return
        await self.app.start()
        self._exit_watch = asyncio.get_running_loop().create_task(self._stop_when_app_exits(stop))

    async def _stop_when_app_exits(self, stop: asyncio.Event) -> None:
        await self.app.exited.wait()
        log.info("application exited with %s: draining", self.app.returncode)
        stop.set()

    async def before_drain(self) -> None:
        """Shutdown, first step: inbound stops accepting, outbound serves the exiting application."""
        if self.app is None:
            return
        for capture in self.worker.capture_listeners.values():
            if not capture.outbound:
                capture.drain()
        await self.app.stop(self.options.app_exit_timeout)

    def exit_code(self, proxy_code: int) -> int:
        return self.app.returncode if self.app is not None and self.app.returncode is not None else proxy_code

    async def close(self) -> None:
        if self._exit_watch is not None:
            self._exit_watch.cancel()
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
