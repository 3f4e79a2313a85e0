"""Compile step for capture mode: the tables the transparent listeners run on.

A sidecar in capture mode (``meshproxy run --capture``) gets two listeners instead of an
explicit HTTP port, both in the snapshot like any other listener:

* ``virtualOutbound`` (default 0.0.0.0:15001): every connection the pod's application opens,
  redirected by ``meshproxy pod-init``.  Its :class:`OutboundCapture` table maps a connection's
  original destination (service VIP, ServiceEntry address) and port to a :class:`CaptureTarget`:
  the protocol (declared, or sniffed), the route table HTTP requests use (the mesh table, whose
  fallback virtual host is the service the VIP belongs to) and, for TCP, the L4 listener model
  (routes and the name metrics report).  HTTP is routed by Host on the mesh route table; when the
  Host names no service, the target's ``route_table`` (one default virtual host: the service the
  VIP belongs to, or passthrough / block_all) decides.  Destinations the mesh does not know follow the Sidecar
  resource's ``outboundTrafficPolicy``: ``ALLOW_ANY`` to ``PassthroughCluster`` (the original
  destination), ``REGISTRY_ONLY`` to ``BlackHoleCluster`` (HTTP: a direct 502; TCP: closed).
* ``virtualInbound`` (default 0.0.0.0:15006): connections to the pod's address; per application
  port an ``inbound|<port>||`` cluster on 127.0.0.1 and, for HTTP ports, an inbound route table
  (reported with ``reporter="destination"``).  A port nobody declared is forwarded as TCP
  (Istio's InboundPassthroughCluster).

Protocol of a service port, as Istio decides it (:func:`port_protocol`): ``appProtocol`` wins,
then the port name's prefix before the first ``-`` (``http``, ``http2``, ``grpc``, ``tcp``,
``tls``, ``https``, ...); ports 25, 53, 3306 and 27017 are TCP (server-first protocols); any
other port is sniffed (HTTP/1.1 or TCP by the first bytes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from .hosts import domains
from .model import (
    EMPTY_MAP, Cluster, DirectResponse, Endpoint, HttpRoute, LoadBalancerPolicy, Listener, RouteTable,
    TcpRoute, TrafficPolicy, VirtualHost, WeightedDestination,
)

if TYPE_CHECKING:
    from .compile import _Compiler

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
SERVER_FIRST_PORTS = frozenset({25, 53, 3306, 27017})
_NAMED = {"http": "HTTP", "http2": "HTTP", "grpc": "HTTP", "grpc-web": "HTTP", "h2c": "HTTP",
          "tcp": "TCP", "tls": "TCP", "https": "TCP", "mongo": "TCP", "redis": "TCP", "mysql": "TCP"}
_APP_PROTOCOLS = {"kubernetes.io/h2c": "HTTP", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "TCP"}


def port_protocol(name: str = "", app_protocol: str = "", number: int = 0, declared: str = "") -> str:
    """``"HTTP"``, ``"TCP"`` or ``"SNIFF"`` for one service port (TLS/HTTPS are proxied as TCP)."""
    if declared:
        return "HTTP" if declared.upper() in ("HTTP", "HTTP2", "GRPC", "GRPC-WEB") else "TCP"
    if app_protocol:
        ap = app_protocol.lower()
        if ap in _APP_PROTOCOLS:
            return _APP_PROTOCOLS[ap]
        head = ap.split("-")[0]
        if head in _NAMED:
            return _NAMED[head]
    lowered = name.lower()
    if lowered.startswith("grpc-web"):
        return "HTTP"
    head = lowered.split("-")[0]
    if head in _NAMED:
        return _NAMED[head]
    if number in SERVER_FIRST_PORTS:
        return "TCP"
    return "SNIFF"


@dataclass(frozen=True)
class CaptureConfig:
    """Capture mode of this proxy (from ``meshproxy run --capture``)."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    bind: str = "0.0.0.0"
    app_ports: tuple[tuple[str, int], ...] = ()     # (port name, number): the application's ports
    protocol_detection_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class CaptureTarget:
    """Where one captured destination goes."""

    protocol: str                     # "HTTP" | "TCP" | "SNIFF"
    service: str = ""                 # FQDN, "" for unknown destinations
    route_table: str = ""             # HTTP: the fallback table (only a default virtual host) when Host names no service
    tcp: Listener | None = None       # TCP: the L4 listener model (routes; its name labels metrics)


@dataclass(frozen=True)
class OutboundCapture:
    targets: Mapping[tuple[str, int], CaptureTarget]   # (VIP, port) -> target
    unknown_http_table: str                          # fallback for unknown destinations: passthrough / block_all
    unknown_tcp: Listener                            # PassthroughCluster or BlackHoleCluster
    mode: str = "ALLOW_ANY"                          # outboundTrafficPolicy
    detection_timeout: float = 5.0
    # DNS: every name of every service this proxy sees -> its addresses
    names: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: EMPTY_MAP)
    mesh_table: str = "http"                         # the table HTTP is routed on by Host
    http_ports: frozenset[int] = frozenset()         # ports some service speaks HTTP on: unknown destinations there are sniffed


@dataclass(frozen=True)
class InboundCapture:
    targets: Mapping[int, CaptureTarget]             # application port -> target
    passthrough: Listener                            # undeclared ports: TCP to 127.0.0.1:<port>
    detection_timeout: float = 5.0
    authz: object = None                             # the workload's AuthorizationPolicies (HTTP views)
    mtls: object = None                              # its PeerAuthentication (security.peer_authn.MtlsPolicy)


def _passthrough_cluster() -> Cluster:
    return Cluster(PASSTHROUGH, service=PASSTHROUGH, port=0, subset=None, endpoints=(),
                   policy=TrafficPolicy(load_balancer=LoadBalancerPolicy(simple="PASSTHROUGH")),
                   protocol="TCP", namespace="unknown")


def add_capture_listeners(c: "_Compiler", capture: CaptureConfig, base_table: str, cluster_name) -> None:
    """Add the two capture listeners, their route tables and clusters to the compiler's output
    (``cluster_name``: the compiler's naming function)."""

    sidecar = c.sidecar.spec if c.sidecar is not None else None
    mode = getattr(sidecar, "outbound_mode", "ALLOW_ANY") or "ALLOW_ANY"
    base: RouteTable = c.route_tables[base_table]
    c.clusters[PASSTHROUGH] = _passthrough_cluster()
    pass_dest = WeightedDestination(PASSTHROUGH, None, None, 100, PASSTHROUGH)
    if mode == "REGISTRY_ONLY":
        unknown_vh = VirtualHost("block_all", ("*",), (HttpRoute(
            name="block_all", source="Sidecar outboundTrafficPolicy REGISTRY_ONLY",
            direct_response=DirectResponse(502, b"")),))
        unknown_tcp = Listener(BLACKHOLE, capture.bind, capture.outbound_port, "TCP",
                               tcp_routes=(TcpRoute((WeightedDestination(BLACKHOLE, None, None, 100, ""),),
                                                    "outboundTrafficPolicy REGISTRY_ONLY"),))
    else:
        unknown_vh = VirtualHost("allow_any", ("*",), (HttpRoute(
            name="allow_any", source="Sidecar outboundTrafficPolicy ALLOW_ANY", destinations=(pass_dest,),
            timeout=c.settings.default_route_timeout),))
        unknown_tcp = Listener(PASSTHROUGH, capture.bind, capture.outbound_port, "TCP",
                               tcp_routes=(TcpRoute((pass_dest,), "outboundTrafficPolicy ALLOW_ANY"),))
    unknown_table = "capture|unknown"
    c.route_tables[unknown_table] = RouteTable(unknown_table, default=base.default or unknown_vh)

    in_scope = c._egress_scope(_catch_all_hosts(sidecar))
    targets: dict[tuple[str, int], CaptureTarget] = {}
    names: dict[str, list[str]] = {}
    http_ports: set[int] = set()
    for host, svc in c.services.items():
        if not svc.addresses or host.startswith("*") or not in_scope(svc.namespace, host):
            continue
        for name in domains(host, c.identity.namespace):
            names.setdefault(name, [])
            names[name] += [a for a in svc.addresses if a not in names[name]]
        for port in svc.ports:
            protocol = port_protocol(port.name, "", port.number,
                                     "" if svc.origin == "workloads" else port.protocol)
            target = _outbound_target(c, base, host, svc, port, protocol, cluster_name)
            if protocol != "TCP":
                http_ports.add(port.number)
            for address in svc.addresses:
                targets[(address, port.number)] = target
    c.listeners.append(Listener("virtualOutbound", capture.bind, capture.outbound_port, "CAPTURE_OUTBOUND",
                                capture=OutboundCapture(
                                    MappingProxyType(targets), unknown_table, unknown_tcp, mode,
                                    capture.protocol_detection_timeout,
                                    MappingProxyType({k: tuple(v) for k, v in names.items()}), base_table,
                                    frozenset(http_ports))))

    inbound: dict[int, CaptureTarget] = {}
    for pname, number in capture.app_ports:
        cname = cluster_name(number, None, "", "inbound")
        c.clusters[cname] = Cluster(cname, service="", port=number, subset=None,
                                    endpoints=(Endpoint("127.0.0.1", number),), protocol="TCP",
                                    namespace=c.identity.namespace)
        dest = WeightedDestination("", None, number, 100, cname)
        protocol = port_protocol(pname, "", number)
        name = f"inbound_{number}"
        table = ""
        if protocol != "TCP":
            table = f"inbound|{number}"
            vh = VirtualHost(table, ("*",), (HttpRoute(name="", source=f"--app-port {pname}:{number}",
                                                       destinations=(dest,),
                                                       timeout=c.settings.default_route_timeout),))
            c.route_tables[table] = RouteTable(table, default=vh)
        tcp = Listener(name, capture.bind, number, "TCP", tcp_routes=(TcpRoute((dest,), f"--app-port {number}"),),
                       authz=c.security.authz)
        inbound[number] = CaptureTarget(protocol, "", table, tcp)
    c.clusters[INBOUND_PASSTHROUGH] = Cluster(
        INBOUND_PASSTHROUGH, service=INBOUND_PASSTHROUGH, port=0, subset=None, endpoints=(),
        policy=TrafficPolicy(load_balancer=LoadBalancerPolicy(simple="PASSTHROUGH")), protocol="TCP",
        namespace=c.identity.namespace)
    passthrough = Listener("inbound_passthrough", capture.bind, capture.inbound_port, "TCP",
                           tcp_routes=(TcpRoute((WeightedDestination(INBOUND_PASSTHROUGH, None, None, 100,
                                                                     INBOUND_PASSTHROUGH),), "undeclared port"),))
    c.listeners.append(Listener("virtualInbound", capture.bind, capture.inbound_port, "CAPTURE_INBOUND",
                                capture=InboundCapture(MappingProxyType(inbound), passthrough,
                                                       capture.protocol_detection_timeout, c.security.authz,
                                                       c.security.mtls)))


def add_explicit_inbound(c: "_Compiler", inbound: tuple, cluster_name) -> None:
    """Explicit mode: one inbound listener per (bind, port, app port, name), forwarding to the
    application on 127.0.0.1 (HTTP with ``reporter="destination"`` metrics and server spans, or TCP
    by the port name).  The control plane hands this listener out as the workload's endpoint."""
    used = {(l.address, l.port) for l in c.listeners}
    for bind, port, app_port, pname in inbound:
        if (bind, port) in used:
            c.warn(f"--inbound-port: {bind}:{port} is already used by another listener; no inbound listener")
            continue
        cname = cluster_name(app_port, None, "", "inbound")
        c.clusters[cname] = Cluster(cname, service="", port=app_port, subset=None,
                                    endpoints=(Endpoint("127.0.0.1", app_port),), protocol="TCP",
                                    namespace=c.identity.namespace)
        dest = WeightedDestination("", None, app_port, 100, cname)
        name = f"inbound_{port}"
        # the workload's AuthorizationPolicies and PeerAuthentication apply as on Sidecar ingress listeners
        security = {"authz": c.security.authz, "mtls": c.security.mtls.for_port(app_port)}
        if port_protocol(pname, "", app_port) == "TCP":
            c.listeners.append(Listener(name, bind, port, "TCP",
                                        tcp_routes=(TcpRoute((dest,), f"--app-port {pname}:{app_port}"),),
                                        **security))
            continue
        vh = VirtualHost(f"inbound|{port}", ("*",), (HttpRoute(name="", source=f"--app-port {pname}:{app_port}",
                                                               destinations=(dest,),
                                                               timeout=c.settings.default_route_timeout),))
        c.route_tables[name] = RouteTable(name, default=vh)
        c.listeners.append(Listener(name, bind, port, "HTTP", route_table=name, **security))


def _catch_all_hosts(sidecar) -> tuple[str, ...] | None:
    if sidecar is None:
        return None
    catch_all = [e for e in sidecar.egress if e.port is None]
    return catch_all[0].hosts if catch_all else ()


def _outbound_target(c, base: RouteTable, host, svc, port, protocol, cluster_name) -> CaptureTarget:
    tcp = None
    if protocol != "HTTP":
        routes = _tcp_routes(c, host, port.number, cluster_name)
        tcp = Listener(f"outbound|{port.number}||{host}", "", port.number, "TCP", tcp_routes=routes)
    table = ""
    if protocol != "TCP":
        table = f"capture|{port.number}|{host}"
        fallback = base.exact.get(f"{host}:{port.number}") or base.exact.get(host)
        c.route_tables[table] = RouteTable(table, default=fallback or base.default)
    return CaptureTarget(protocol, host, table, tcp)


def _tcp_routes(c, host: str, port: int, cluster_name) -> tuple[TcpRoute, ...]:
    """The L4 route for a captured connection to host:port: a VirtualService tcp route that names
    the host (and matches the port), else the service itself."""
    for r in c.by_kind.get("VirtualService", []):
        vs = r.spec
        if not vs.tcp or not c._applies(r, "mesh"):
            continue
        if not any(c.resolve(h, r.namespace) == host for h in vs.hosts):
            continue
        routes = c._l4_routes(r, vs.tcp, "mesh", port)
        if routes:
            return routes
    dest = WeightedDestination(host, None, port, 100, cluster_name(port, None, host))
    return (TcpRoute((dest,), f"implicit TCP route to {host}:{port}"),)
