# cython: auto_pickle=True
# (the snapshot's types are pickled by a process group to its workers: scripts/build_ext.py)
"""The compiled routing snapshot the proxy runs on.

Everything here is frozen and built once by :mod:`meshproxy.config.compile`
from decoded Istio resources.  A request reads the current :class:`Snapshot` once and
uses it to the end, so a reload never mixes new routes with old clusters.

The snapshot is pure data.  Runtime state (weighted-round-robin counters, load balancer
state, outlier ejections, connection pools) lives in objects that the data plane builds
*from* a snapshot (``meshproxy.router`` / ``meshproxy.cluster``), keyed by the names used
here so that state survives a reload when a cluster's config did not change.

Compiled (``scripts/build_ext.py``), the classes a request reads (routes, virtual hosts, the
snapshot itself, ...) are extension types declared in ``model.pxd``: the request path reads
their fields as C struct members instead of looking them up by name.  Without a compiler they
are ordinary frozen dataclasses.

Durations are float seconds; ``None`` means "not set / disabled".
Hosts are canonical lower-case FQDNs (``reviews.default.svc.cluster.local``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import cython  # compiled: the classes in model.pxd are extension-type dataclasses; pure Python: plain frozen dataclasses

EMPTY_MAP: Mapping = MappingProxyType({})


# ---------------------------------------------------------------- matching


@cython.dataclasses.dataclass(frozen=True)
class StringMatch:
    """Istio StringMatch: exactly one of exact / prefix / regex.

    ``regex`` is compiled at decode time and matched with ``fullmatch`` (Envoy anchors
    RE2 safe_regex to the whole value).  ``ignore_case`` only applies to exact/prefix
    (Istio's ``ignoreUriCase``); for those ``value`` is already lower-cased.
    """

    kind: str                      # "exact" | "prefix" | "regex"
    value: str
    regex: re.Pattern | None = None
    ignore_case: bool = False


@cython.dataclasses.dataclass(frozen=True)
class HeaderMatch:
    name: str                      # lower-case
    match: StringMatch | None      # None = presence check (``myheader: {}``)


@cython.dataclasses.dataclass(frozen=True)
class RouteMatch:
    """One HTTPMatchRequest.  All conditions inside are AND-ed; a route's matches are OR-ed."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    without_headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: tuple[tuple[str, str], ...] = ()   # resolved at compile time against the proxy's labels
    gateways: tuple[str, ...] = ()                     # "ns/name" or "mesh"; resolved at compile time


# ---------------------------------------------------------------- route actions


@cython.dataclasses.dataclass(frozen=True, repr=False)   # Cython's generated repr breaks on a field named "set"
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()          # lower-case names

    def __repr__(self) -> str:
        return f"HeaderOps(set={self.set!r}, add={self.add!r}, remove={self.remove!r})"


@cython.dataclasses.dataclass(frozen=True)
class HeaderPolicy:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


NO_HEADER_POLICY = HeaderPolicy()


@cython.dataclasses.dataclass(frozen=True)
class WeightedDestination:
    """One HTTPRouteDestination / RouteDestination after compilation."""

    host: str                      # canonical FQDN of the destination service
    subset: str | None
    port: int | None
    weight: int                    # >= 0; share = weight / sum(weights of the route)
    cluster: str                   # name of the Cluster in Snapshot.clusters ("" if it does not exist -> 503 NR/UH)
    headers: HeaderPolicy = NO_HEADER_POLICY


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    derive_port: str | None = None        # "FROM_PROTOCOL_DEFAULT" | "FROM_REQUEST_PORT"
    prefix_rewrite: str | None = None
    code: int = 301


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None                # replaces the matched prefix when the route matched on a prefix
    authority: str | None = None
    uri_regex: re.Pattern | None = None   # uriRegexRewrite.match
    uri_regex_rewrite: str | None = None  # uriRegexRewrite.rewrite (Python replacement syntax, \1 style converted)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@cython.dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int                         # retries, not tries; 0 = disabled
    per_try_timeout: float | None
    retry_on: frozenset[str]              # Envoy conditions: "5xx", "gateway-error", "reset", "connect-failure", ...
    retriable_status_codes: frozenset[int] = frozenset()
    allow_non_idempotent: bool = False    # our extension: retries of POST/PATCH only when asked
    backoff_base: float = 0.025
    # retryIgnorePreviousHosts: a retry goes to an endpoint this request has not tried while
    # there is one (Istio's default); False: the balancer picks among all, the failed one too
    ignore_previous_hosts: bool = True


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float | None = None
    delay_percentage: float = 0.0         # 0..100
    abort_status: int | None = None
    abort_percentage: float = 0.0


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    host: str
    subset: str | None
    port: int | None
    cluster: str
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool | None = None
    forward_unmatched_preflights: bool = True    # unmatchedPreflights: FORWARD (Istio's default) | IGNORE


@cython.dataclasses.dataclass(frozen=True)
class HttpRoute:
    """One Istio HTTPRoute.  Exactly one of destinations / redirect / direct_response is set."""

    name: str
    source: str                                      # "VirtualService default/reviews: spec.http[0]"
    matches: tuple[RouteMatch, ...] = ()             # empty = matches every request
    destinations: tuple[WeightedDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None
    retries: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    headers: HeaderPolicy = NO_HEADER_POLICY
    cors: CorsPolicy | None = None


@cython.dataclasses.dataclass(frozen=True)
class VirtualHost:
    """The routes for one set of domains, from one VirtualService (or the implicit
    default route to a service when no VirtualService names it)."""

    name: str                                        # "default/reviews" or "service:reviews.default.svc.cluster.local"
    domains: tuple[str, ...]                         # every alias that reaches it ("reviews", "reviews.default", ...)
    routes: tuple[HttpRoute, ...]


@cython.dataclasses.dataclass(frozen=True)
class RouteTable:
    """Domain -> VirtualHost index for one HTTP listener.

    Lookup (``meshproxy.router``): lower-case the Host, try ``exact[host]`` (entries exist
    both with and without ``:port``), then wildcard suffixes from the longest, then
    ``default``.  Cost is independent of the number of hosts.
    """

    name: str
    exact: Mapping[str, VirtualHost] = cython.dataclasses.field(default_factory=lambda: EMPTY_MAP)
    wildcards: tuple[tuple[str, VirtualHost], ...] = ()   # (".example.com", vh) longest suffix first
    default: VirtualHost | None = None


# ---------------------------------------------------------------- clusters


@cython.dataclasses.dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    labels: Mapping[str, str] = cython.dataclasses.field(default_factory=lambda: EMPTY_MAP)
    weight: int = 1
    locality: str = ""


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    key: str                        # "header" | "cookie" | "source_ip" | "query" | "none" (useSourceIp: false)
    name: str = ""                  # header / cookie / query parameter name
    cookie_ttl: float | None = None
    cookie_path: str = "/"
    algorithm: str = "ring"         # "ring" | "maglev"
    minimum_ring_size: int = 1024


@dataclass(frozen=True, slots=True)
class LoadBalancerPolicy:
    simple: str = "LEAST_REQUEST"   # Istio's default; ROUND_ROBIN | LEAST_REQUEST | RANDOM | PASSTHROUGH
    consistent_hash: ConsistentHash | None = None
    warmup: float | None = None     # warmupDurationSecs


@dataclass(frozen=True, slots=True)
class ConnectionPoolPolicy:
    max_connections: int = 2**31 - 1
    connect_timeout: float = 10.0
    max_pending_requests: int = 2**31 - 1   # http.http1MaxPendingRequests (waiting for a connection)
    max_requests: int = 2**31 - 1           # http.http2MaxRequests (in flight; Envoy max_requests)
    max_requests_per_connection: int = 0    # 0 = unlimited
    idle_timeout: float | None = 3600.0
    max_retries: int = 2**31 - 1
    max_idle_per_endpoint: int = 128        # our keep-alive pool cap
    # tcp.tcpKeepalive (probes, idle time s, interval s; None = the system's), tcp.maxConnectionDuration and
    # tcp.idleTimeout (None = not set): applied to TCP proxy connections (downstream/tcp_proxy.py)
    tcp_keepalive: tuple[int | None, float | None, float | None] | None = None
    max_connection_duration: float | None = None
    tcp_idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0
    split_local_origin: bool = False         # splitExternalLocalOriginErrors
    consecutive_local_origin: int | None = None   # consecutiveLocalOriginFailures (Envoy's default 5 when split)
    http_error_codes: frozenset[int] = frozenset()  # outlierDetectionHttpErrorCodes: also count as errors


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """DestinationRule ``trafficPolicy.tls`` as applied (mode DISABLE = no UpstreamTls at all).
    Files are paths; ``alpn`` what the client offers (ISTIO_MUTUAL: Istio's tokens)."""

    mode: str                                   # SIMPLE | MUTUAL | ISTIO_MUTUAL
    sni: str = ""
    subject_alt_names: tuple[str, ...] = ()
    ca_certificates: str = ""
    client_certificate: str = ""
    private_key: str = ""
    insecure_skip_verify: bool = False
    alpn: tuple[str, ...] = ()
    auto: bool = False                          # auto mTLS: plaintext when this proxy has no certificate
    # credentialName (gateways): the Secret's PEMs instead of the files, ``credential`` naming it
    credential: str = ""
    certificate_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False, metadata={"secret": True})
    ca_pem: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerPolicy = LoadBalancerPolicy()
    connection_pool: ConnectionPoolPolicy = ConnectionPoolPolicy()
    outlier: OutlierPolicy | None = None
    tls: UpstreamTls | None = None              # None = plaintext
    # no DestinationRule tls: auto mTLS to the endpoints labelled security.istio.io/tlsMode=istio
    auto_mtls: UpstreamTls | None = None


DEFAULT_TRAFFIC_POLICY = TrafficPolicy()
TLS_MODE_LABEL = "security.istio.io/tlsMode"


def endpoint_tls(policy: TrafficPolicy, endpoint: "Endpoint") -> UpstreamTls | None:
    """The TLS a connection to ``endpoint`` originates: the DestinationRule's, else auto mTLS
    when the endpoint has a sidecar (label ``security.istio.io/tlsMode: istio``), else none."""
    if policy.tls is not None:
        return policy.tls
    if policy.auto_mtls is not None and endpoint.labels.get(TLS_MODE_LABEL) == "istio":
        return policy.auto_mtls
    return None


@dataclass(frozen=True, slots=True)
class Cluster:
    """Envoy's cluster: one service port (and subset) with its endpoints and policy.

    Name follows Istio: ``outbound|9080|v1|reviews.default.svc.cluster.local``.
    """

    name: str
    service: str                    # canonical FQDN
    port: int
    subset: str | None
    endpoints: tuple[Endpoint, ...]
    policy: TrafficPolicy = DEFAULT_TRAFFIC_POLICY
    protocol: str = "HTTP"          # HTTP | TCP | HTTPS ...
    resolution: str = "STATIC"      # STATIC | DNS
    dns_hosts: tuple[tuple[str, int], ...] = ()   # for DNS resolution: names to resolve (address, port)
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)  # subset labels (for metrics: destination_version)


# ---------------------------------------------------------------- listeners


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """One Gateway server's certificate, TLS options and client-certificate policy, chosen by SNI.

    The certificate comes from files (``certificate``/``private_key``), from a Secret
    (``credentialName``: the PEM bytes, ``credential`` naming it) or, for ISTIO_MUTUAL, from the
    proxy's workload certificate.  ``key_pem`` is marked secret: /config_dump never shows it."""

    sni: str                                         # host pattern ("shop.example.com", "*.example.com", "*")
    certificate: str                                 # PEM file ("" when from a Secret or ISTIO_MUTUAL)
    private_key: str                                 # PEM file
    min_version: str = "TLSV1_2"                     # TLSV1_0 .. TLSV1_3 (TLS_AUTO = TLSV1_2, Envoy's server default)
    max_version: str = "TLSV1_3"
    cipher_suites: tuple[str, ...] = ()              # OpenSSL names, TLS 1.2 and below; () = library default
    mode: str = "SIMPLE"                             # SIMPLE | MUTUAL | OPTIONAL_MUTUAL | ISTIO_MUTUAL
    ca_certificates: str = ""                        # PEM file: the CAs client certificates must chain to
    subject_alt_names: tuple[str, ...] = ()          # a client certificate must carry one of these SANs
    spki_sha256: tuple[str, ...] = ()                # verifyCertificateSpki: base64 SHA-256 of the key (SPKI)
    cert_sha256: tuple[str, ...] = ()                # verifyCertificateHash: lower-case hex SHA-256 of the DER
    credential: str = ""                             # "namespace/name" of the Secret the PEMs came from
    certificate_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False, metadata={"secret": True})
    ca_pem: bytes = field(default=b"", repr=False)


# Gateway TLS modes whose servers verify client certificates
CLIENT_VERIFYING_MODES = frozenset({"MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL"})


@dataclass(frozen=True, slots=True)
class TlsSettings:
    mode: str                                        # "SIMPLE" (per-server modes: ServerCertificate.mode)
    certificates: tuple[ServerCertificate, ...]      # first is the default (no or unknown SNI)


@dataclass(frozen=True, slots=True)
class TcpMatch:
    """One L4MatchAttributes block, the parts decided per connection: the connection's
    destination address in one of ``destination_subnets`` (when any) and its source address
    in ``source_subnet`` (when set)."""

    destination_subnets: tuple = ()               # ipaddress networks
    source_subnet: object = None                  # an ipaddress network, or None


@dataclass(frozen=True, slots=True)
class TcpRoute:
    destinations: tuple[WeightedDestination, ...]
    source: str = ""
    # Gateway PASSTHROUGH (VirtualService tls routes): the SNI names this route takes ("*.x" wildcards);
    # a listener whose routes carry them reads the ClientHello and routes on its SNI, without terminating
    sni_hosts: tuple[str, ...] = ()
    matches: tuple[TcpMatch, ...] = ()            # destinationSubnets / sourceSubnet, OR-ed; () = every connection


def sni_matches(patterns: tuple[str, ...], sni: str) -> bool:
    """An SNI against sniHosts: exact (case-insensitive), ``*.suffix`` for one or more labels, or ``*``."""
    sni = sni.lower()
    for p in patterns:
        p = p.lower()
        if p == "*" or p == sni or (p.startswith("*.") and sni.endswith(p[1:]) and len(sni) > len(p) - 1):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str
    port: int
    protocol: str                  # "HTTP" | "HTTPS" | "TCP"
    route_table: str = ""          # HTTP/HTTPS: key into Snapshot.route_tables
    tcp_routes: tuple[TcpRoute, ...] = ()   # TCP: first route (weighted) wins
    tls: TlsSettings | None = None
    # the workload's AuthorizationPolicies (a meshproxy.security.authz.PolicySet; None = none apply),
    # enforced on inbound and gateway listeners
    authz: object = None
    # inbound listeners: the PeerAuthentication mode of the port (STRICT | PERMISSIVE | DISABLE);
    # "" = not an inbound listener (no peer authentication)
    mtls: str = ""
    capture: object = None         # CAPTURE_OUTBOUND / CAPTURE_INBOUND: config.capture's tables


@cython.dataclasses.dataclass(frozen=True)
class ProxySettings:
    """Limits and timeouts that are not per route (configurable from the command line)."""

    header_read_timeout: float = 10.0        # whole request head must arrive within this -> 408
    body_timeout: float = 60.0               # request body bytes must keep arriving within this -> 408
    idle_timeout: float = 60.0               # downstream keep-alive idle
    upstream_connect_timeout: float = 10.0
    default_route_timeout: float | None = None   # Istio: no timeout unless the route sets one
    max_connections_per_listener: int = 10_000
    tcp_idle_timeout: float = 3600.0
    drain_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    kind: str
    namespace: str
    name: str
    source: str                    # file path or "controlplane"
    version: str = ""


@cython.dataclasses.dataclass(frozen=True)
class Snapshot:
    version: str
    listeners: tuple[Listener, ...]
    route_tables: Mapping[str, RouteTable]
    clusters: Mapping[str, Cluster]
    resources: tuple[ResourceInfo, ...] = ()
    warnings: tuple[str, ...] = ()          # accepted-with-notes (shadowed VS, missing subset, ...)
    settings: ProxySettings = cython.dataclasses.field(default_factory=ProxySettings)
