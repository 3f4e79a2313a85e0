"""Socket options of upstream connections, from a DestinationRule's connection pool."""
from __future__ import annotations

import socket


def set_keepalive(sock, keepalive: tuple) -> None:
    """TCP keepalive on an upstream socket: (probes, idle seconds, interval seconds), each
    None for the system's value (Istio's connectionPool.tcp.tcpKeepalive)."""
    if sock is None:
        return
    probes, idle, interval = keepalive
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if probes:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(probes))
        if idle:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        if interval:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(interval)))
    except OSError:
        pass
