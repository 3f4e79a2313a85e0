"""Where a redirected connection was going: ``SO_ORIGINAL_DST`` (conntrack's pre-NAT address).

``meshproxy pod-init``'s ``redirect`` rules rewrite the destination of each captured connection
to the sidecar's capture port; the kernel keeps the original in the connection's conntrack entry,
and ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (IPv6: ``SOL_IPV6, IP6T_SO_ORIGINAL_DST``) returns it
as a ``sockaddr_in``/``sockaddr_in6``.  A connection that was not redirected has no NAT entry: the
call fails (ENOENT) or returns the socket's own address; both are "no original destination".
"""
from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80     # linux/netfilter_ipv6/ip6_tables.h


class NoOriginalDestination(Exception):
    """The connection was not redirected (or its conntrack entry is gone)."""


def original_destination(sock) -> tuple[str, int]:
    """``(address, port)`` the client connected to before the redirect.

    ``sock``: a socket, or what ``transport.get_extra_info("socket")`` returns."""
    family = sock.family
    local = sock.getsockname()
    try:
        if family == socket.AF_INET6:
            raw = sock.getsockopt(socket.SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, = struct.unpack_from("!H", raw, 2)
            address = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            if address.startswith("::ffff:") and "." in address:
                address = address[7:]
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!H4s", raw, 2)
            address = socket.inet_ntoa(packed)
    except OSError as err:
        raise NoOriginalDestination(f"SO_ORIGINAL_DST: {err.strerror or err}") from None
    if (address, port) == (local[0], local[1]):
        raise NoOriginalDestination(f"connection to {address}:{port} was not redirected")
    return address, port
