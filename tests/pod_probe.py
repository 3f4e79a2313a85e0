"""A tiny server and client to run inside test pods (``python tests/pod_probe.py ...``).

serve TAG PORT[/udp] ...   listen on 0.0.0.0 on each port; every TCP connection is answered with
                           one line ``TAG PORT ORIGINAL_DST`` (``-`` when the connection was not
                           redirected) and closed; every UDP datagram with the same line.
                           Prints ``ready`` once all ports are bound.
connect HOST PORT [UID]      connect (as UID if given), print the line the server sent (or ``error: ...``)
udp HOST PORT               send one datagram, print the answer (or ``error: ...``)
agent                       read such ``connect``/``udp`` commands from stdin, one answer line each
                            (one process per pod instead of one per probe: :class:`Agent`)
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


def main(argv: list[str]) -> int:
    cmd = argv[0]
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
