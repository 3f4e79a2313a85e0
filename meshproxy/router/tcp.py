"""TCP route selection: the first route whose match accepts the connection.

A route without runtime matches takes every connection.  A route's matches are OR-ed; inside
one match the destination address must lie in one of ``destination_subnets`` (when any) and
the source address in ``source_subnet`` (when set), as Istio's L4MatchAttributes say.  The
destination is the address the connection was accepted on (the original destination once
traffic is captured).  Pure: addresses in, route out.
"""
from __future__ import annotations

import ipaddress
from typing import Sequence

from ..config.model import TcpMatch, TcpRoute


def _address(text: str | None):
    if not text:
        return None
    try:
        addr = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _accepts(match: TcpMatch, destination, source) -> bool:
    if match.destination_subnets and (destination is None or not any(
            destination.version == net.version and destination in net for net in match.destination_subnets)):
        return False
    net = match.source_subnet
    if net is not None and (source is None or source.version != net.version or source not in net):
        return False
    return True


def select_tcp_route(routes: Sequence[TcpRoute], destination: str | None, source: str | None) -> TcpRoute | None:
    """The first of ``routes`` that takes a connection from ``source`` to ``destination``."""
    dst = src = None
    parsed = False
    for route in routes:
        if not route.matches:
            return route
        if not parsed:
            dst, src, parsed = _address(destination), _address(source), True
        if any(_accepts(m, dst, src) for m in route.matches):
            return route
    return None
