"""Real parts for integration tests: an upstream the test controls, a real
``meshproxy run`` process, and raw socket clients.

Everything binds loopback port 0 (or asks the kernel for a free port).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from meshproxy.codec import DEFAULT_BACKEND

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CODECS = [DEFAULT_BACKEND, "h11"]   # the backends every integration test runs over (llhttp compiled, httptools pure)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ==================================================================== upstream


@dataclass
class ReceivedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


Behaviour = Callable[[ReceivedRequest, asyncio.StreamWriter], Awaitable[bool]]


async def ok_behaviour(req: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
    body = json.dumps({"method": req.method, "target": req.target, "body_len": len(req.body)}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return True       # keep the connection


class Upstream:
    """An HTTP/1.1 origin on loopback that records exactly what it received.

    ``behaviour(req, writer)`` decides the answer; it returns False to close the
    connection afterwards.  ``raw`` holds every byte received, per connection.
    """

    def __init__(self, behaviour: Behaviour = ok_behaviour, name: str = "upstream"):
        self.behaviour = behaviour
        self.name = name
        self.requests: list[ReceivedRequest] = []
        self.raw: list[bytearray] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "Upstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def serve_in_thread(self) -> "Upstream":
        """Serve from an event loop of its own in a daemon thread: an upstream a module-scoped
        fixture shares across tests (each test runs in its own loop).  :meth:`stop_thread` ends it."""
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start())
            started.set()
            self._loop.run_forever()
        self._thread = threading.Thread(target=run, name=f"{self.name}-thread", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("threaded upstream did not start")
        return self

    def stop_thread(self) -> None:
        async def stop() -> None:
            await self.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:              # connections the proxy still holds open
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def forget(self) -> None:
        """Clear what was recorded (a shared upstream, before each test)."""
        self.requests.clear()
        self.raw.clear()
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        raw = bytearray()
        self.raw.append(raw)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                raw += head
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in l.split(":", 1)) for l in lines[1:]]
                hmap = {k.lower(): v for k, v in headers}
                body = b""
                if "content-length" in hmap:
                    body = await reader.readexactly(int(hmap["content-length"]))
                    raw += body
                elif hmap.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        raw += line
                        size = int(line.split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        raw += data
                        if size == 0:
                            break
                        chunks.append(data[:-2])
                    body = b"".join(chunks)
                req = ReceivedRequest(method, target, headers, body, bytes(head) + body)
                self.requests.append(req)
                keep = await self.behaviour(req, writer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def respond(status: int = 200, body: bytes = b"ok", headers: dict | None = None, keep: bool = True) -> Behaviour:
    async def behaviour(req, writer):
        hdrs = {"content-length": str(len(body)), **(headers or {})}
        writer.write(f"HTTP/1.1 {status} X\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in hdrs.items()) + b"\r\n" + body)
        return keep
    return behaviour


# ==================================================================== the proxy under test


def service_entry_yaml(host: str, port: int, endpoints: list[tuple[str, int, dict]], protocol: str = "HTTP",
                       name: str | None = None, namespace: str = "default") -> str:
    eps = "\n".join(
        f"  - address: {addr}\n    ports:\n      http: {p}" + (
            "\n    labels:\n" + "\n".join(f"      {k}: {v}" for k, v in labels.items()) if labels else "")
        for addr, p, labels in endpoints)
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: {name or host.split('.')[0]}
          namespace: {namespace}
        spec:
          hosts: [{host}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - number: {port}
            name: http
            protocol: {protocol}
          endpoints:
        """) + eps + "\n"


class ProxyProcess:
    """``meshproxy run`` as a real child process."""

    def __init__(self, config_dir: Path, codec: str = DEFAULT_BACKEND, extra_args: list[str] | None = None,
                 workers: int = 1, listen_port: int | None = None):
        self.config_dir = config_dir
        self.codec = codec
        self.port = listen_port or free_port()
        self.admin_port = free_port()
        self.extra_args = extra_args or []
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log_path = config_dir.parent / f"proxy-{self.port}.log"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait: bool = True) -> "ProxyProcess":
        cmd = [PYTHON, "-m", "meshproxy", "run", "--config", str(self.config_dir),
               "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
               "--codec", self.codec, "--workers", str(self.workers),
               # no drain grace at teardown (tests of the grace pass their own, which wins)
               "--drain-grace", "0", *self.extra_args]
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}:\n{self.log()}")
            if self.admin("/ready")[0] == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"proxy not ready after {timeout}s:\n{self.log()}")

    def admin(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.admin_url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()


# ==================================================================== clients


async def raw_exchange(port: int, data: bytes | list[bytes], timeout: float = 3.0,
                       delay_between: float = 0.0, until: Callable[[bytes], bool] | None = None,
                       settle: float = 0.2) -> tuple[bytes, bool]:
    """Send ``data`` (one write, or one write per element) and read until the proxy
    closes or ``timeout`` passes.  Returns (bytes read, closed_by_peer).

    ``until(bytes read so far)``, e.g. :func:`responses_complete`: once it holds, read only for
    ``settle`` seconds more (whatever else the proxy sends in that time, or its close, is still
    seen) instead of waiting out ``timeout`` on a connection the proxy rightly keeps open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parts = [data] if isinstance(data, bytes) else data
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if delay_between:
                await asyncio.sleep(delay_between)
    except ConnectionError:
        pass
    out = bytearray()
    closed = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
        except asyncio.TimeoutError:
            break
        except ConnectionError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        out += chunk
        if until is not None and until(bytes(out)):
            deadline = min(deadline, loop.time() + settle)
            until = None
    writer.close()
    return bytes(out), closed


def responses_complete(count: int) -> Callable[[bytes], bool]:
    """For ``raw_exchange(until=...)``: ``count`` whole responses read (heads, and bodies framed
    by content-length or chunked; 1xx and 204/304 have none).  Not for answers to HEAD."""
    def check(data: bytes) -> bool:
        seen, i = 0, 0
        while seen < count:
            end = data.find(b"\r\n\r\n", i)
            if end < 0:
                return False
            lines = data[i:end].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            i = end + 4
            if 100 <= status < 200:
                continue
            seen += 1
            if status in (204, 304):
                continue
            if "content-length" in headers:
                i += int(headers["content-length"])
                if i > len(data):
                    return False
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    line_end = data.find(b"\r\n", i)
                    if line_end < 0:
                        return False
                    size = int(data[i:line_end].split(b";")[0], 16)
                    i = line_end + 2
                    if size == 0:
                        trailer_end = data.find(b"\r\n\r\n", i - 2)
                        if trailer_end < 0:
                            return False
                        i = trailer_end + 4
                        break
                    i += size + 2
                    if i > len(data):
                        return False
            else:
                return False            # delimited by the close: wait for it
        return True
    return check


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream into (status, headers, body) for CL- or chunk-framed responses."""
    out = []
    i = 0
    while i < len(data):
        end = data.find(b"\r\n\r\n", i)
        if end < 0:
            break
        lines = data[i:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), v.strip())
        i = end + 4
        body = b""
        if status in (100, 101):
            out.append((status, headers, b""))
            continue
        if "content-length" in headers:
            n = int(headers["content-length"])
            body = data[i:i + n]
            i += n
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                line_end = data.find(b"\r\n", i)
                size = int(data[i:line_end].split(b";")[0], 16)
                i = line_end + 2
                if size == 0:
                    i = data.find(b"\r\n", i) + 2
                    break
                parts.append(data[i:i + size])
                i += size + 2
            body = b"".join(parts)
        out.append((status, headers, body))
    return out


async def eventually(predicate, timeout: float = 20.0, step: float = 0.01) -> None:
    """Wait until predicate() is true; generous by default so a busy machine does not fail it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached within the time limit"
        await asyncio.sleep(step)


async def http_get(port: int, host: str, path: str = "/", headers: dict | None = None,
                   timeout: float = 5.0) -> tuple[int, dict, bytes]:
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    data, _ = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{hdrs}Connection: close\r\n\r\n".encode(),
                                 timeout=timeout)
    responses = parse_responses(data)
    if not responses:
        raise AssertionError(f"no response: {data!r}")
    return responses[0]
