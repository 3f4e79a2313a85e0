"""A tiny server and client to run inside test pods (``python tests/pod_probe.py ...``).

serve TAG PORT[/udp] ...   listen on 0.0.0.0 on each port; every TCP connection is answered with
                           one line ``TAG PORT ORIGINAL_DST`` (``-`` when the connection was not
                           redirected) and closed; every UDP datagram with the same line.
                           Prints ``ready`` once all ports are bound.
connect HOST PORT [UID]      connect (as UID if given), print the line the server sent (or ``error: ...``)
udp HOST PORT               send one datagram, print the answer (or ``error: ...``)
agent                       read such ``connect``/``udp`` commands from stdin, one answer line each
                            (one process per pod instead of one per probe: :class:`Agent`)
http TAG PORT               an application that knows nothing of the mesh: HTTP/1.1 on 0.0.0.0:PORT,
                            every request answered ``TAG`` (header ``x-seen-traceparent`` echoes the
                            request's traceparent); ``/health`` answers 200, ``/fail-health`` 500
echo PORT                   a TCP echo server (echoes until the client half-closes, then closes)
dns PORT NAME=IP,...        a DNS server (UDP) answering A queries for those names, NXDOMAIN else
otlp HOST FILE              an OTLP/HTTP trace receiver (tests/telemetry/otlp_receiver.py) on HOST; prints
                            ``ready`` and its endpoint, writes the spans received so far to FILE (JSON)
"""
from __future__ import annotations

import os
import socket
import subprocess
import struct
import sys
import threading

SO_ORIGINAL_DST = 80


def original_dst(sock: socket.socket) -> str:
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return "-"
    port, packed = struct.unpack("!2xH4s8x", raw)
    ip = socket.inet_ntoa(packed)
    local = sock.getsockname()
    return "-" if (ip, port) == (local[0], local[1]) else f"{ip}:{port}"


def serve_tcp(tag: str, port: int, ready: threading.Barrier) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    ready.wait()
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(f"{tag} {port} {original_dst(conn)}\n".encode())


def serve_udp(tag: str, port: int, ready: threading.Barrier) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    ready.wait()
    while True:
        _, peer = srv.recvfrom(2048)
        srv.sendto(f"{tag} {port} udp\n".encode(), peer)


def _connect(host: str, port: int, uid: int | None = None) -> str:
    if uid is not None:
        # a child with that uid makes the connection (the agent itself stays root)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.write(w, _connect(host, port).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            answer = f.read()
        os.waitpid(pid, 0)
        return answer
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            return s.makefile().readline().strip()
    except OSError as err:
        return f"error: {err}"


def _udp(host: str, port: int) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(b"q", (host, port))
        return s.recvfrom(2048)[0].decode().strip()
    except OSError as err:
        return f"error: {err}"
    finally:
        s.close()


def _command(words: list[str]) -> str:
    if words[0] == "connect":
        return _connect(words[1], int(words[2]), int(words[3]) if len(words) > 3 else None)
    if words[0] == "udp":
        return _udp(words[1], int(words[2]))
    return f"error: unknown command {words[0]!r}"


class Agent:
    """A probe client living in a pod: ``agent.connect(host, port, uid=None)`` -> the answer line."""

    def __init__(self, pod):
        self.proc = pod.popen([sys.executable, __file__, "agent"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def ask(self, *words) -> str:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def connect(self, host: str, port: int, uid: int | None = None) -> str:
        return self.ask("connect", host, port, *([uid] if uid is not None else []))

    def udp(self, host: str, port: int) -> str:
        return self.ask("udp", host, port)


def serve_http(tag: str, port: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            status = 500 if self.path == "/fail-health" else 200
            body = tag.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.send_header("x-seen-traceparent", self.headers.get("traceparent", ""))
            self.send_header("x-seen-host", self.headers.get("host", ""))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def serve_echo(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    print("ready", flush=True)

    def echo(conn):
        # a connection that starts with b"HOLD" is answered only after the client's FIN (all of
        # it at once): what a half-close round trip needs; others are echoed as bytes arrive
        with conn:
            data = conn.recv(65536)
            held = [] if data.startswith(b"HOLD") else None
            while data:
                if held is None:
                    conn.sendall(data)
                else:
                    held.append(data)
                data = conn.recv(65536)
            if held:
                conn.sendall(b"".join(held))
            conn.shutdown(socket.SHUT_WR)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def serve_dns(port: int, table: str) -> None:
    import dns.message
    import dns.rcode
    import dns.rrset

    names = dict(item.split("=", 1) for item in table.split(",") if item)

    def answer(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        if name in names:
            if q.rdtype == 1:
                response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", names[name]))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))

    def udp_loop():
        while True:
            data, peer = udp.recvfrom(4096)
            try:
                udp.sendto(answer(data), peer)
            except Exception:
                pass

    threading.Thread(target=udp_loop, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "http":
        serve_http(argv[1], int(argv[2]))
        return 0
    if cmd == "echo":
        serve_echo(int(argv[1]))
        return 0
    if cmd == "dns":
        serve_dns(int(argv[1]), argv[2])
        return 0
    if cmd == "otlp":
        import dataclasses
        import json
        import time
        from telemetry.otlp_receiver import OtlpReceiver
        receiver = OtlpReceiver(host=argv[1]).start()
        print("ready", flush=True)
        print(receiver.endpoint, flush=True)
        written = -1
        while True:
            time.sleep(0.1)
            with receiver._lock:
                spans = [dataclasses.asdict(s) for s in receiver.spans]
            if len(spans) != written:
                with open(argv[2] + ".tmp", "w") as f:
                    json.dump(spans, f)
                os.replace(argv[2] + ".tmp", argv[2])
                written = len(spans)
    if cmd == "serve":
        tag, specs = argv[1], argv[2:]
        ready = threading.Barrier(len(specs) + 1)
        for spec in specs:
            port, _, proto = spec.partition("/")
            target = serve_udp if proto == "udp" else serve_tcp
            threading.Thread(target=target, args=(tag, int(port), ready), daemon=True).start()
        ready.wait()
        print("ready", flush=True)
        threading.Event().wait()
        return 0
    if cmd in ("connect", "udp"):
        print(_command(argv))
        return 0
    if cmd == "agent":
        for line in sys.stdin:
            if line.strip():
                print(_command(line.split()), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
