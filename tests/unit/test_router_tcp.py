"""TCP route selection by the connection's addresses (L4MatchAttributes subnets)."""
from __future__ import annotations

import ipaddress

from meshproxy.config.model import TcpMatch, TcpRoute
from meshproxy.router.tcp import select_tcp_route


def route(name: str, *matches: TcpMatch) -> TcpRoute:
    return TcpRoute((), name, matches=matches)


def nets(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


def test_first_route_whose_match_takes_the_connection_wins_and_matches_are_ored():
    routes = (route("db", TcpMatch(nets("10.1.0.0/16")), TcpMatch(nets("10.2.0.0/16"))),
              route("from-batch", TcpMatch((), ipaddress.ip_network("192.168.7.0/24"))),
              route("rest"))
    assert select_tcp_route(routes, "10.2.3.4", "192.168.7.9").source == "db"
    assert select_tcp_route(routes, "10.3.0.1", "192.168.7.9").source == "from-batch"
    assert select_tcp_route(routes, "10.3.0.1", "192.168.8.9").source == "rest"
    assert select_tcp_route(routes[:2], "10.3.0.1", "192.168.8.9") is None


def test_both_conditions_of_one_match_must_hold_and_families_never_mix():
    both = (route("r", TcpMatch(nets("fd00::/8"), ipaddress.ip_network("10.0.0.0/8"))),)
    assert select_tcp_route(both, "fd00::1", "10.9.9.9").source == "r"
    assert select_tcp_route(both, "fd00::1", "11.0.0.1") is None
    assert select_tcp_route(both, "10.0.0.1", "10.9.9.9") is None
    # an IPv4 client seen through an IPv6 socket is its IPv4 address; a zone index is ignored
    v4 = (route("r", TcpMatch(nets("127.0.0.0/8"))),)
    assert select_tcp_route(v4, "::ffff:127.0.0.1", None).source == "r"
    assert select_tcp_route((route("r", TcpMatch(nets("fe80::/10"))),), "fe80::1%eth0", None).source == "r"
    assert select_tcp_route(v4, None, None) is None
