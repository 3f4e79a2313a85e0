"""Istio networking resources as decoded: typed, frozen, validated, not yet resolved.

:mod:`meshproxy.config.decode` is the only place that builds these from raw mappings;
:mod:`meshproxy.config.compile` turns them into a :class:`~meshproxy.config.model.Snapshot`.

What is here is what the YAML said, with types checked and values normalised (durations
as float seconds, percentages as floats 0..100, regexes compiled, header names
lower-cased).  What is *not* done yet is everything that depends on other resources or on
the proxy: host names are as written (short names not expanded), destinations name no
cluster, ``sourceLabels`` / ``gateways`` are not evaluated.  Parts that need no further
resolution reuse the snapshot's own types (``StringMatch``, ``Redirect``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

from .model import (
    EMPTY_MAP, ConnectionPoolPolicy, CorsPolicy, DirectResponse, FaultPolicy, HeaderPolicy,
    LoadBalancerPolicy, NO_HEADER_POLICY, OutlierPolicy, Redirect, RetryPolicy, Rewrite, RouteMatch,
)

# ---------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class Destination:
    host: str                      # as written (short name, FQDN or ServiceEntry host)
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int | None = None      # None = not written (single destination gets everything)
    headers: HeaderPolicy = NO_HEADER_POLICY


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    """HTTPMatchRequest: the runtime conditions, plus the selectors evaluated at compile time."""

    match: RouteMatch              # carries source_labels and gateways unresolved
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class Delegate:
    name: str
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    index: int                     # position in spec.http, for messages
    name: str = ""
    match: tuple[HTTPMatch, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None
    retries: RetryPolicy | None = None          # None = not written (the mesh default applies)
    fault: FaultPolicy | None = None
    grpc_abort: str | None = None               # fault.abort.grpcStatus (not served by this data plane)
    mirrors: tuple[Mirror, ...] = ()
    headers: HeaderPolicy = NO_HEADER_POLICY
    cors: CorsPolicy | None = None


@dataclass(frozen=True, slots=True)
class L4Match:
    port: int | None = None
    gateways: tuple[str, ...] = ()
    source_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    source_namespace: str | None = None
    destination_subnets: tuple[str, ...] = ()
    source_subnet: str | None = None
    sni_hosts: tuple[str, ...] = ()             # TLS routes only


@dataclass(frozen=True, slots=True)
class L4Route:
    """TCPRoute or TLSRoute."""

    index: int
    match: tuple[L4Match, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    hosts: tuple[str, ...]
    gateways: tuple[str, ...] = ()              # as written; () = mesh only
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[L4Route, ...] = ()
    tls: tuple[L4Route, ...] = ()
    export_to: tuple[str, ...] = ()


# ---------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class ClientTLS:
    mode: str = "DISABLE"
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    sni: str = ""
    insecure_skip_verify: bool = False
    subject_alt_names: tuple[str, ...] = ()
    credential_name: str = ""          # a Secret in the proxy's namespace (gateways; see compile)


@dataclass(frozen=True, slots=True)
class PolicyParts:
    """The four parts of a TrafficPolicy that merge as whole fields (None = not written)."""

    load_balancer: LoadBalancerPolicy | None = None
    connection_pool: ConnectionPoolPolicy | None = None
    outlier: OutlierPolicy | None = None
    tls: ClientTLS | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicySpec:
    parts: PolicyParts = PolicyParts()
    port_level: tuple[tuple[int, PolicyParts], ...] = ()   # (port number, parts), in written order


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    traffic_policy: TrafficPolicySpec | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    host: str
    traffic_policy: TrafficPolicySpec | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: Mapping[str, str] | None = None


# ---------------------------------------------------------------- ServiceEntry


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: str = "TCP"          # upper-case Istio protocol
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    network: str = ""
    locality: str = ""
    weight: int = 1
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    hosts: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: Mapping[str, str] | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


# ---------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class PortSpec:
    number: int
    protocol: str = ""             # upper-case
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServerTLS:
    mode: str = "SIMPLE"
    https_redirect: bool = False
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    credential_names: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    min_protocol_version: str = ""
    max_protocol_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    verify_spki: tuple[str, ...] = ()      # base64 SHA-256 of a client key's SPKI
    verify_hash: tuple[str, ...] = ()      # lower-case hex SHA-256 of a client certificate (no colons)


@dataclass(frozen=True, slots=True)
class Server:
    index: int
    port: PortSpec
    hosts: tuple[str, ...]         # "ns/host" or "host" (= "*/host")
    bind: str = ""
    tls: ServerTLS | None = None
    default_endpoint: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Gateway:
    servers: tuple[Server, ...]
    selector: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)


# ---------------------------------------------------------------- Sidecar


@dataclass(frozen=True, slots=True)
class IngressListener:
    index: int
    port: PortSpec
    bind: str = ""
    capture_mode: str = "DEFAULT"
    default_endpoint: str = ""     # "127.0.0.1:8080" | "0.0.0.0:8080" | "unix://..."


@dataclass(frozen=True, slots=True)
class EgressListener:
    index: int
    hosts: tuple[str, ...]         # "ns/dnsName"
    port: PortSpec | None = None
    bind: str = ""
    capture_mode: str = "DEFAULT"


@dataclass(frozen=True, slots=True)
class Sidecar:
    workload_selector: Mapping[str, str] | None = None
    ingress: tuple[IngressListener, ...] = ()
    egress: tuple[EgressListener, ...] = ()
    outbound_mode: str = "ALLOW_ANY"            # outboundTrafficPolicy.mode


@dataclass(frozen=True, slots=True)
class SecretSpec:
    """A core ``v1`` Secret as a Gateway's ``credentialName`` uses it: PEM certificate chain,
    private key (never shown: ``repr=False``, redacted wherever objects are printed) and CA."""
    type: str = "kubernetes.io/tls"
    certificate: bytes = field(default=b"", repr=False)     # tls.crt (or cert)
    key: bytes = field(default=b"", repr=False)             # tls.key (or key)
    ca: bytes = field(default=b"", repr=False)              # ca.crt (or cacert)
    withheld: str = ""          # the control plane's reason for not sending this proxy the data


Spec = Union[VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar, SecretSpec]


@dataclass(frozen=True, slots=True)
class Resource:
    """One decoded, valid Istio resource and where it came from."""

    kind: str
    namespace: str
    name: str
    spec: Spec
    source: str = ""               # file path, or "controlplane"
    index: int = 0                 # document index inside the source
    api_version: str = "networking.istio.io/v1"
    creation_timestamp: str = ""   # RFC 3339 as written; "" = unknown (sorts after known ones)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    content_hash: str = ""         # hash of the document body; equal body -> equal hash
    warnings: tuple[str, ...] = ()  # decoder warnings (accepted, not applied), each with its path

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        """``VirtualService default/reviews``: the prefix of every message about it."""
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML/JSON document as read: where it came from and its raw body."""

    source: str                    # file path, or "controlplane"
    index: int                     # position of the document in its source (0-based)
    body: dict
