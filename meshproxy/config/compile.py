"""Decoded Istio resources + who this proxy is -> one immutable :class:`Snapshot`.

Order of work (each step a function below):

1. order resources oldest first (``metadata.creationTimestamp``, then input order) and
   drop those not exported to the proxy's namespace;
2. the service registry: ServiceEntry hosts plus :class:`WorkloadEndpoint` s from the
   control plane, endpoints merged per service;
3. DestinationRules per host, merged as Istio does (first policy wins, subsets joined);
4. clusters ``outbound|<port>|<subset>|<fqdn>``: one per service port and per declared or
   referenced subset, endpoints filtered by subset labels, policy = DR top level <- its
   port level <- subset <- the subset's port level;
5. route tables: sidecar (``mesh``) VirtualServices, oldest first wins a host; implicit
   catch-all virtual hosts for services no VirtualService names; gateway VirtualServices
   merged per host with catch-alls last;
6. listeners: the default HTTP listener, Sidecar egress/ingress listeners, Gateway servers.

Nothing here is guessed silently: a destination that cannot be served gets cluster ``""``
(the data plane answers 503 NR) and a warning names the field that caused it.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterable, Mapping

from ..security.peer_authn import DISABLE, resolve_mtls
from .compile_security import auto_mtls, peer_authentications, spiffe_id, upstream_tls, workload_security
from .decode import DEFAULT_RETRY_POLICY
from .hosts import domains, host_covers, intersect_hosts, namespaced_host_matches, resolve_host
from .model import (
    EMPTY_MAP, Cluster, ConnectionPoolPolicy, Endpoint, HttpRoute, LoadBalancerPolicy, Listener,
    MirrorPolicy, ProxySettings, Redirect, ResourceInfo, RetryPolicy, RouteTable, ServerCertificate, Snapshot,
    TcpMatch, TcpRoute, TLS_MODE_LABEL, TlsSettings, TrafficPolicy, UpstreamTls, VirtualHost, WeightedDestination,
)
from .resources import (
    DestinationRule, Gateway, HTTPRoute, L4Route, PolicyParts, Resource, RouteDestination, Server,
    ServiceEntry, ServicePort, Sidecar, Subset, TrafficPolicySpec, VirtualService,
)

DEFAULT_LISTENER = "http"
ROOT_NAMESPACE = "istio-system"
RETRY_NON_IDEMPOTENT_ANNOTATION = "meshproxy.io/retry-non-idempotent"
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """Who the proxy is: decides which resources apply and where listeners bind."""

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    mode: str = "sidecar"                                  # "sidecar" | "gateway"
    http_listen: tuple[str, int] = ("127.0.0.1", 15001)
    gateway_bind: str = "0.0.0.0"
    capture: object = None         # config.capture.CaptureConfig: transparent listeners instead of http_listen
    # explicit mode: (bind address, inbound port, application port, port name): the listener peers
    # reach this workload through (its registered endpoint), forwarding to the application on loopback
    inbound: tuple = ()
    # the proxy has a workload certificate from the mesh CA (it joined with a bootstrap token):
    # what Gateway ISTIO_MUTUAL servers terminate with
    workload_certificate: bool = False


@dataclass(frozen=True, slots=True)
class WorkloadEndpoint:
    """An endpoint registered through the control plane.

    ``service``: FQDN, or a short name resolved against ``namespace``.  ``ports``: port
    name -> number (matched by name against a ServiceEntry's ports, or defining the
    service's ports when no ServiceEntry exists), or a plain list of numbers.
    """

    service: str
    namespace: str = "default"
    address: str = "127.0.0.1"
    ports: Mapping[str, int] | tuple[int, ...] = field(default_factory=lambda: EMPTY_MAP)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    weight: int = 1
    locality: str = ""
    vip: str = ""                  # the service's virtual IP, allocated by the control plane
    proxy_port: int = 0            # explicit sidecars: the endpoint is the sidecar's inbound listener
    # the workload's SPIFFE id when its sidecar registered with a workload certificate: it has a
    # sidecar that terminates mTLS (auto mTLS goes to it) and the service runs as this identity
    identity: str = ""


@dataclass(frozen=True, slots=True)
class CompileResult:
    snapshot: Snapshot
    warnings: list[str]
    # the service registry, rules and clusters (steps 2-4): lets :mod:`meshproxy.config.incremental`
    # patch one service's endpoints, or redo only routes and listeners, without a whole rebuild
    registry: RegistryState | None = None


def cluster_name(port: int, subset: str | None, host: str, direction: str = "outbound") -> str:
    return f"{direction}|{port}|{subset or ''}|{host}"


# ---------------------------------------------------------------- registry


@dataclass(slots=True)
class _Service:
    host: str
    namespace: str
    ports: list[ServicePort]
    resolution: str = "STATIC"
    endpoints: list[tuple[str, Mapping[str, int], Mapping[str, str], int, str]] = field(default_factory=list)
    origin: str = ""                               # "ServiceEntry ns/name" or "workloads"
    addresses: list[str] = field(default_factory=list)   # VIPs: ServiceEntry addresses, allocated VIPs
    # identities the service runs as (ServiceEntry subjectAltNames, its endpoints' serviceAccount):
    # what auto mTLS and ISTIO_MUTUAL check the server's SPIFFE id against
    identities: list[str] = field(default_factory=list)

    def port(self, number: int | None) -> ServicePort | None:
        if number is None:
            return self.ports[0] if self.ports else None
        return next((p for p in self.ports if p.number == number), None)


def workload_ports(w: WorkloadEndpoint) -> dict[str, int]:
    """A registered workload's ports by name (a plain list of numbers gets ``port-N`` names)."""
    return dict(w.ports) if not isinstance(w.ports, (tuple, list)) else {f"port-{p}": p for p in w.ports}


def meshed_identity(w: WorkloadEndpoint) -> str:
    """The SPIFFE id peers originate auto mTLS to, or "": a workload registered with an identity
    has a sidecar whose inbound listener (explicit ``--inbound-port`` or the capture listener)
    terminates mTLS as its PeerAuthentication says."""
    return w.identity


def workload_entry(w: WorkloadEndpoint, named: Mapping[str, int]) -> tuple:
    """The registry's endpoint entry for a workload (also what an endpoint patch rebuilds)."""
    reach = {name: w.proxy_port for name in named} if w.proxy_port else named
    labels = MappingProxyType({**w.labels, TLS_MODE_LABEL: "istio"}) if meshed_identity(w) else w.labels
    return (w.address, MappingProxyType(dict(reach)), labels, w.weight, w.locality)


def _protocol_from_name(name: str) -> str:
    head = name.split("-")[0].upper()
    return head if head in HTTP_PROTOCOLS or head in ("HTTPS", "TCP", "TLS") else "HTTP"


@dataclass(slots=True)
class RegistryState:
    """Steps 2-4 of a compile (registry, DestinationRules, clusters) and their warnings: a
    later compile whose ServiceEntries, DestinationRules and workloads are unchanged reuses
    it and redoes only routes and listeners (:mod:`meshproxy.config.incremental`).
    ``implicit`` caches each service's implicit virtual hosts (host -> (service, entries))."""
    services: dict[str, "_Service"]
    rules: dict
    clusters: dict[str, Cluster]
    warnings: list[str]
    implicit: dict = field(default_factory=dict)
    # every PeerAuthentication: auto mTLS sends plaintext to an endpoint whose workload's mode is DISABLE
    peer_auth: tuple = ()


class _Compiler:
    def __init__(self, resources: list[Resource], identity: ProxyIdentity, settings: ProxySettings,
                 workloads: Iterable[WorkloadEndpoint], registry: RegistryState | None = None):
        self.identity = identity
        self.settings = settings
        self.warnings: list[str] = []
        ordered = sorted(enumerate(resources), key=lambda p: (p[1].creation_timestamp or "\uffff", p[0]))
        self.resources = [r for _, r in ordered if self._visible(r)]
        for r in self.resources:            # what the decoder accepted but this proxy does not apply
            self.warnings.extend(r.warnings)
        self.by_kind: dict[str, list[Resource]] = {}
        for r in self.resources:
            self.by_kind.setdefault(r.kind, []).append(r)
        self._wild_rules: list[str] | None = None
        own = len(self.warnings)           # the resources' own warnings; the registry's start after them
        if registry is not None:           # same ServiceEntries, DestinationRules and workloads as before
            self.services, self.rules = registry.services, registry.rules
            self.known = frozenset(self.services)
            self.clusters = dict(registry.clusters)
            self.warnings.extend(registry.warnings)
            self.peer_auth = registry.peer_auth
            self.registry = RegistryState(self.services, self.rules, registry.clusters, registry.warnings,
                                          registry.implicit, registry.peer_auth)
        else:
            self.services: dict[str, _Service] = {}
            self.peer_auth = peer_authentications(self.resources)
            self._build_registry(list(workloads))
            self.known = frozenset(self.services)
            self.rules: dict[str, tuple[TrafficPolicySpec | None, dict[str, Subset]]] = {}
            self.credential_sources: dict[int, tuple[Resource, str]] = {}   # id(ClientTLS) -> where written
            self._merge_destination_rules()
            self._warn_tcp_only_pool_fields()
            self.clusters: dict[str, Cluster] = {}
            self._build_clusters()
            self.registry = RegistryState(self.services, self.rules, dict(self.clusters), list(self.warnings[own:]),
                                          peer_auth=self.peer_auth)
        self.route_tables: dict[str, RouteTable] = {}
        self.listeners: list[Listener] = []
        self.sidecar = self._select_sidecar()
        self.security = workload_security(self.resources, identity.namespace, identity.labels, ROOT_NAMESPACE)

    # -- visibility & helpers

    def _visible(self, r: Resource) -> bool:
        export = getattr(r.spec, "export_to", ())
        if not export or "*" in export:
            return True
        ns = self.identity.namespace
        return ns in export or ("." in export and r.namespace == ns)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def resolve(self, host: str, namespace: str) -> str:
        return resolve_host(host, namespace, self.known)

    def _labels_match(self, selector: Mapping[str, str] | None) -> bool:
        return all(self.identity.labels.get(k) == v for k, v in (selector or {}).items())

    # -- 2. registry

    def _build_registry(self, workloads: list[WorkloadEndpoint]) -> None:
        for r in self.by_kind.get("ServiceEntry", []):
            se: ServiceEntry = r.spec
            for i, raw_host in enumerate(se.hosts):
                host = resolve_host(raw_host, r.namespace)
                if host in self.services:
                    self.warn(f"{r.ref}: spec.hosts[{i}]: host {host} is already defined by "
                              f"{self.services[host].origin} (older); ignored")
                    continue
                svc = _Service(host, r.namespace, list(se.ports), se.resolution, origin=r.ref,
                               addresses=[a for a in map(_single_ip, se.addresses) if a],
                               identities=list(se.subject_alt_names))
                for ep in se.endpoints:
                    svc.endpoints.append((ep.address, ep.ports, ep.labels, ep.weight, ep.locality))
                    if ep.service_account:
                        svc.identities.append(spiffe_id(r.namespace, ep.service_account))
                self.services[host] = svc
        for w in workloads:
            host = resolve_host(w.service, w.namespace)
            named = workload_ports(w)
            svc = self.services.get(host)
            if svc is None:
                ports = [ServicePort(number, name, _protocol_from_name(name)) for name, number in named.items()]
                svc = self.services[host] = _Service(host, w.namespace, ports, "STATIC", origin="workloads")
            elif svc.origin == "workloads":
                for name, number in named.items():
                    if svc.port(number) is None:
                        svc.ports.append(ServicePort(number, name, _protocol_from_name(name)))
            svc.endpoints.append(workload_entry(w, named))
            if meshed_identity(w) and w.identity not in svc.identities:
                svc.identities.append(w.identity)
            if w.vip and w.vip not in svc.addresses:
                svc.addresses.append(w.vip)

    # -- 3. DestinationRules

    def _merge_destination_rules(self) -> None:
        owners: dict[str, Resource] = {}
        for r in self.by_kind.get("DestinationRule", []):
            dr: DestinationRule = r.spec
            self._note_credentials(r)
            if dr.workload_selector is not None and (
                    r.namespace != self.identity.namespace or not self._labels_match(dr.workload_selector)):
                continue
            host = self.resolve(dr.host, r.namespace)
            if host not in self.rules:
                self.rules[host] = (dr.traffic_policy, {s.name: s for s in dr.subsets})
                owners[host] = r
                continue
            first = owners[host]
            policy, subsets = self.rules[host]
            if dr.traffic_policy is not None:
                if policy is None:
                    policy = dr.traffic_policy
                else:
                    self.warn(f"{r.ref}: spec.trafficPolicy: ignored, {first.ref} (older) already sets the "
                              f"traffic policy for host {host}")
            for s in dr.subsets:
                if s.name in subsets:
                    self.warn(f"{r.ref}: spec.subsets: duplicate subset {s.name!r} for host {host}, "
                              f"the one in {first.ref} (older) is kept")
                else:
                    subsets[s.name] = s
            self.rules[host] = (policy, subsets)

    def _note_credentials(self, r: Resource) -> None:
        """Remember where each ``tls`` with a credentialName is written (its resource and path),
        for :meth:`_client_credential`."""
        dr: DestinationRule = r.spec
        specs = [("spec.trafficPolicy", dr.traffic_policy)] + [
            (f"spec.subsets[{i}].trafficPolicy", sub.traffic_policy) for i, sub in enumerate(dr.subsets)]
        for path, spec in specs:
            if spec is None:
                continue
            for where, parts in [(path, spec.parts)] + [(f"{path}.portLevelSettings[{i}]", parts)
                                                        for i, (_, parts) in enumerate(spec.port_level)]:
                if parts.tls is not None and parts.tls.credential_name:
                    self.credential_sources[id(parts.tls)] = (r, f"{where}.tls.credentialName")

    def _client_credential(self, client, tls: UpstreamTls) -> UpstreamTls:
        """DestinationRule ``tls.credentialName`` -> the Secret's client certificate, key and CA
        (Istio's rules: on gateways, and on sidecars only from a DestinationRule with a
        workloadSelector; the Secret in the proxy's namespace; the CA in it or in
        ``<name>-cacert``).  Where it cannot be applied the cluster fails closed: its
        connections are refused (never plaintext, never without the certificate) and the
        warning names the path and why."""
        r, path = self.credential_sources.get(id(client), (None, "tls.credentialName"))
        where = f"{r.ref}: {path}" if r is not None else path
        ns = self.identity.namespace
        failed = replace(tls, credential=f"{ns}/{client.credential_name}")
        if self.identity.mode != "gateway" and (r is None or r.spec.workload_selector is None):
            self.warn(f"{where}: applies on gateways, and on sidecars only from a DestinationRule with a "
                      f"workloadSelector (Istio); connections of this sidecar to {tls.sni or 'the host'} are refused")
            return failed
        secrets = {x.name: x.spec for x in self.by_kind.get("Secret", []) if x.namespace == ns}
        secret = secrets.get(client.credential_name)
        other = secrets.get(client.credential_name + "-cacert")
        for name, value in ((client.credential_name, secret), (client.credential_name + "-cacert", other)):
            if value is not None and value.withheld:
                self.warn(f"{where}: Secret {ns}/{name} withheld by the control plane: {value.withheld}; "
                          "connections are refused")
                return failed
        if secret is None:
            self.warn(f"{where}: no Secret {ns}/{client.credential_name} (looked up in this proxy's namespace, "
                      f"{ns}); connections are refused")
            return failed
        if tls.mode == "MUTUAL" and not secret.certificate:
            self.warn(f"{where}: Secret {ns}/{client.credential_name} has no client certificate and key "
                      "(tls.crt/tls.key or cert/key); connections are refused")
            return failed
        ca = secret.ca or (other.ca if other is not None else b"")
        if not ca:
            self.warn(f"{where}: no CA to verify the server with: no ca.crt/cacert in Secret "
                      f"{ns}/{client.credential_name} and no Secret {ns}/{client.credential_name}-cacert; "
                      "connections are refused")
            return failed
        return replace(failed, certificate_pem=secret.certificate if tls.mode == "MUTUAL" else b"",
                       key_pem=secret.key if tls.mode == "MUTUAL" else b"", ca_pem=ca)

    def _warn_tcp_only_pool_fields(self) -> None:
        """connectionPool.tcp.idleTimeout acts on TCP proxy connections only: say so where a
        DestinationRule sets it for HTTP ports (tcpKeepalive and maxConnectionDuration are
        applied to both)."""
        fields = (("tcp_idle_timeout", "idleTimeout",
                   "HTTP upstream connections close after connectionPool.http.idleTimeout, as in Istio"),)
        for r in self.by_kind.get("DestinationRule", []):
            dr: DestinationRule = r.spec
            svc = self.services.get(self.resolve(dr.host, r.namespace))
            http_ports = {p.number for p in svc.ports if _cluster_protocol(p.protocol) != "TCP"} if svc else set()
            if not http_ports:
                continue
            specs = [("spec.trafficPolicy", dr.traffic_policy)] + [
                (f"spec.subsets[{i}].trafficPolicy", s.traffic_policy) for i, s in enumerate(dr.subsets)]
            for path, spec in specs:
                if spec is None:
                    continue
                places = [(path, spec.parts, http_ports)] + [
                    (f"{path}.portLevelSettings[{i}]", parts, http_ports & {number})
                    for i, (number, parts) in enumerate(spec.port_level)]
                for where, parts, ports in places:
                    pool = parts.connection_pool
                    if pool is None or not ports:
                        continue
                    for attr, name, instead in fields:
                        if getattr(pool, attr) is not None:
                            self.warn(f"{r.ref}: {where}.connectionPool.tcp.{name}: applied to TCP connections "
                                      f"only; not to HTTP upstream connections (port "
                                      f"{', '.join(map(str, sorted(ports)))}): {instead}")

    def _rule_for(self, host: str) -> tuple[TrafficPolicySpec | None, dict[str, Subset]]:
        if host in self.rules:
            return self.rules[host]
        if self._wild_rules is None:           # only wildcard hosts need a scan (longest first)
            self._wild_rules = sorted((p for p in self.rules if p.startswith("*")), key=len, reverse=True)
        best = next((p for p in self._wild_rules if host_covers(p, host)), None)
        return self.rules[best] if best else (None, {})

    # -- 4. clusters

    def _policy(self, top: TrafficPolicySpec | None, subset: Subset | None, port: int, svc: _Service | None = None,
                protocol: str = "HTTP") -> TrafficPolicy:
        parts = _with_port_level(top.parts, top, port) if top is not None else PolicyParts()
        sub = subset.traffic_policy if subset is not None else None
        if sub is not None:
            parts = PolicyParts(load_balancer=sub.parts.load_balancer or parts.load_balancer,
                                connection_pool=sub.parts.connection_pool or parts.connection_pool,
                                outlier=sub.parts.outlier or parts.outlier, tls=sub.parts.tls or parts.tls)
            parts = _with_port_level(parts, sub, port)
        tls = upstream_tls(parts.tls, svc.host if svc else "", port, subset.name if subset else None, protocol,
                           svc.identities if svc else ())
        if tls is not None and parts.tls.credential_name:
            tls = self._client_credential(parts.tls, tls)
        return TrafficPolicy(
            load_balancer=parts.load_balancer or LoadBalancerPolicy(),
            connection_pool=parts.connection_pool
            or ConnectionPoolPolicy(connect_timeout=self.settings.upstream_connect_timeout),
            outlier=parts.outlier,
            tls=tls,
            auto_mtls=auto_mtls(svc.host, port, subset.name if subset else None, protocol, svc.identities)
            if svc is not None and parts.tls is None else None)

    def _build_clusters(self) -> None:
        for host, svc in self.services.items():
            policy, subsets = self._rule_for(host)
            for port in svc.ports:
                self._add_cluster(svc, port, None, policy)
                for subset in subsets.values():
                    self._add_cluster(svc, port, subset, policy)

    def _add_cluster(self, svc: _Service, port: ServicePort, subset: Subset | None,
                     top: TrafficPolicySpec | None) -> None:
        labels = subset.labels if subset is not None else EMPTY_MAP
        endpoints, dns_hosts = cluster_endpoints(svc, port, labels, self.peer_auth)
        target = port.target_port or port.number
        resolution = "STATIC"
        if svc.resolution in ("DNS", "DNS_ROUND_ROBIN", "NONE") and not svc.host.startswith("*"):
            if svc.resolution == "NONE" or (svc.resolution.startswith("DNS") and not svc.endpoints):
                dns_hosts.append((svc.host, target))
            resolution = "DNS" if dns_hosts else "STATIC"
        elif svc.resolution in ("NONE", "DYNAMIC_DNS"):
            resolution = "NONE"
        name = cluster_name(port.number, subset.name if subset else None, svc.host)
        self.clusters[name] = Cluster(
            name=name, service=svc.host, port=port.number, subset=subset.name if subset else None,
            endpoints=tuple(endpoints), policy=self._policy(top, subset, port.number, svc,
                                                            _cluster_protocol(port.protocol)),
            protocol=_cluster_protocol(port.protocol), resolution=resolution, dns_hosts=tuple(dns_hosts),
            namespace=svc.namespace, labels=labels)

    def destination(self, where: str, dest, weight: int, namespace: str, route_port: int | None = None,
                    headers=None) -> WeightedDestination:
        host = self.resolve(dest.host, namespace)
        port = dest.port
        cluster = ""
        svc = self.services.get(host)
        if svc is None:
            self.warn(f"{where}.host: host {host} is not in the service registry (no ServiceEntry or "
                      "registered workload); requests get 503 NR")
        else:
            sp = svc.port(port if port is not None else route_port) or (svc.port(None) if port is None else None)
            if sp is None:
                self.warn(f"{where}.port: port {port} is not a port of {host} "
                          f"(ports: {', '.join(str(p.number) for p in svc.ports) or 'none'}); requests get 503 NR")
            else:
                port = sp.number
                _, subsets = self._rule_for(host)
                if dest.subset and dest.subset not in subsets:
                    self.warn(f"{where}.subset: subset {dest.subset!r} not found in any DestinationRule for "
                              f"host {host}; requests get 503 NR")
                else:
                    cluster = cluster_name(sp.number, dest.subset, host)
        kwargs = {"headers": headers} if headers is not None else {}
        return WeightedDestination(host=host, subset=dest.subset, port=port, weight=weight, cluster=cluster, **kwargs)

    # -- 5. routes

    def _gateways_of(self, r: Resource, refs: Iterable[str]) -> tuple[str, ...]:
        return tuple(g if g == "mesh" or "/" in g else f"{r.namespace}/{g}" for g in refs)

    def _applies(self, r: Resource, context: str) -> bool:
        vs: VirtualService = r.spec
        top = self._gateways_of(r, vs.gateways) or ("mesh",)
        if context in top:
            return True
        return any(context in self._gateways_of(r, m.match.gateways) for h in vs.http for m in h.match) or \
            any(context in self._gateways_of(r, m.gateways) for t in vs.tcp for m in t.match)

    def _selector_ok(self, labels, namespace: str | None) -> bool:
        return self._labels_match(dict(labels)) and namespace in (None, self.identity.namespace)

    def http_routes(self, r: Resource, context: str) -> tuple[HttpRoute, ...]:
        vs: VirtualService = r.spec
        top = self._gateways_of(r, vs.gateways) or ("mesh",)
        allow_non_idempotent = r.annotations.get(RETRY_NON_IDEMPOTENT_ANNOTATION, "").lower() == "true"
        out = []
        for route in vs.http:
            where = f"{r.ref}: spec.http[{route.index}]"
            matches = []
            for m in route.match:
                gws = self._gateways_of(r, m.match.gateways) or top
                if context in gws and self._selector_ok(m.match.source_labels, m.source_namespace):
                    matches.append(m.match)
            if route.match and not matches:
                continue
            if not route.match and context not in top:
                continue
            if route.delegate is not None:       # the decoder warned (fields: HTTPRoute.delegate)
                continue
            out.append(self._http_route(r, route, where, tuple(matches), allow_non_idempotent))
        return tuple(out)

    def _http_route(self, r: Resource, route: HTTPRoute, where: str, matches, allow_non_idempotent: bool) -> HttpRoute:
        match_ports = {m.port for m in matches if m.port is not None}
        route_port = next(iter(match_ports)) if len(match_ports) == 1 else None
        single = len(route.route) == 1
        dests = tuple(
            self.destination(f"{where}.route[{j}].destination", d.destination,
                             100 if single else (d.weight or 0), r.namespace, route_port, d.headers)
            for j, d in enumerate(route.route))
        mirrors = []
        for j, mirror in enumerate(route.mirrors):
            w = self.destination(f"{where}.mirrors[{j}].destination", mirror.destination, 100, r.namespace)
            mirrors.append(MirrorPolicy(w.host, w.subset, w.port, w.cluster, mirror.percentage))
        retries = route.retries if route.retries is not None else DEFAULT_RETRY_POLICY
        if allow_non_idempotent:
            retries = replace(retries, allow_non_idempotent=True)
        timeout = route.timeout if route.timeout is not None else self.settings.default_route_timeout
        return HttpRoute(
            name=route.name, source=where, matches=matches, destinations=dests, redirect=route.redirect,
            direct_response=route.direct_response, rewrite=route.rewrite, timeout=timeout,
            retries=retries if dests else None, fault=route.fault, mirrors=tuple(mirrors), headers=route.headers,
            cors=route.cors)

    def _egress_scope(self, listener_hosts: tuple[str, ...] | None):
        """A predicate (namespace, host) -> bool for the Sidecar egress hosts (None = all)."""
        if listener_hosts is None:
            return lambda ns, host: True
        sidecar_ns = self.sidecar.namespace if self.sidecar else self.identity.namespace
        return lambda ns, host: any(namespaced_host_matches(h, sidecar_ns, ns, host) for h in listener_hosts)

    def mesh_route_table(self, name: str, scope_hosts: tuple[str, ...] | None) -> RouteTable:
        in_scope = self._egress_scope(scope_hosts)
        claimed: dict[str, Resource] = {}
        exact: dict[str, VirtualHost] = {}
        wildcards: dict[str, VirtualHost] = {}
        default = None
        vs_patterns: list[str] = []
        for r in self.by_kind.get("VirtualService", []):
            vs: VirtualService = r.spec
            if not vs.hosts or not vs.http or not self._applies(r, "mesh"):
                continue
            hosts = []
            for i, raw in enumerate(vs.hosts):
                host = self.resolve(raw, r.namespace)
                if not in_scope(r.namespace, host):
                    continue
                if host in claimed:
                    if name == DEFAULT_LISTENER:
                        self.warn(f"{r.ref}: spec.hosts[{i}]: host {host} is already routed by {claimed[host].ref} "
                                  "(older); sidecars use the oldest VirtualService, this one is ignored for it")
                    continue
                claimed[host] = r
                hosts.append(host)
            if not hosts:
                continue
            routes = self.http_routes(r, "mesh")
            vh_domains = []
            for host in hosts:
                vs_patterns.append(host)
                if host == "*":
                    default = VirtualHost(f"{r.namespace}/{r.name}", ("*",), routes)
                elif host.startswith("*"):
                    wildcards[host[1:]] = VirtualHost(f"{r.namespace}/{r.name}", (host,), routes)
                else:
                    svc = self.services.get(host)
                    vh_domains += domains(host, self.identity.namespace, [p.number for p in svc.ports] if svc else ())
            if vh_domains:
                vh = VirtualHost(f"{r.namespace}/{r.name}", tuple(vh_domains), routes)
                for d in vh.domains:
                    exact.setdefault(d, vh)
        routed = set(vs_patterns)                 # exact names: one set lookup per service
        wild = [p for p in routed if p.startswith("*")]
        for host, svc in self.services.items():
            if host in routed or any(host_covers(p, host) for p in wild) or not in_scope(svc.namespace, host):
                continue
            self._implicit_vhosts(svc, exact, wildcards)
        return RouteTable(name, MappingProxyType(exact), _sorted_wildcards(wildcards), default)

    def _implicit_vhosts(self, svc: _Service, exact: dict, wildcards: dict) -> None:
        cached = self.registry.implicit.get(svc.host)
        if cached is None or cached[0] is not svc:
            entries: list[tuple[bool, str, VirtualHost]] = []
            self._implicit_entries(svc, entries)
            cached = self.registry.implicit[svc.host] = (svc, entries)
        for wildcard, domain, vh in cached[1]:
            (wildcards if wildcard else exact).setdefault(domain, vh)

    def _implicit_entries(self, svc: _Service, entries: list) -> None:
        """(wildcard?, domain, vhost) of each implicit virtual host of ``svc``, in order."""
        for i, port in enumerate(svc.ports):
            if _cluster_protocol(port.protocol) == "TCP":
                continue
            cluster = cluster_name(port.number, None, svc.host)
            route = HttpRoute(name="", source=f"{svc.origin}: implicit route to {svc.host}:{port.number}",
                              destinations=(WeightedDestination(svc.host, None, port.number, 100, cluster),),
                              retries=DEFAULT_RETRY_POLICY, timeout=self.settings.default_route_timeout)
            suffix = "" if i == 0 else f":{port.number}"
            vh_name = f"service:{svc.host}{suffix}"
            if svc.host.startswith("*"):
                if i == 0:
                    entries.append((True, svc.host[1:], VirtualHost(vh_name, (svc.host,), (route,))))
                continue
            all_domains = domains(svc.host, self.identity.namespace, [port.number])
            if i > 0:
                all_domains = tuple(d for d in all_domains if d.endswith(f":{port.number}"))
            vh = VirtualHost(vh_name, all_domains, (route,))
            entries.extend((False, d, vh) for d in all_domains)

    # -- 6. listeners: sidecar

    def _select_sidecar(self) -> Resource | None:
        candidates = self.by_kind.get("Sidecar", [])
        ns = self.identity.namespace
        for pick in (lambda r: r.namespace == ns and r.spec.workload_selector is not None
                     and self._labels_match(r.spec.workload_selector),
                     lambda r: r.namespace == ns and r.spec.workload_selector is None,
                     lambda r: r.namespace == ROOT_NAMESPACE and r.spec.workload_selector is None):
            chosen = [r for r in candidates if pick(r)]
            if chosen:
                for other in chosen[1:]:
                    self.warn(f"{other.ref}: {chosen[0].ref} (older) also applies to this proxy; ignored")
                return chosen[0]
        return None

    def sidecar_listeners(self) -> None:
        for r in self.by_kind.get("VirtualService", []):
            if r.spec.tls and self._applies(r, "mesh"):
                self.warn(f"{r.ref}: spec.tls: TLS routes are applied on Gateway TLS servers only; "
                          "sidecars do not route by SNI yet")
        scope = None
        sidecar: Sidecar | None = self.sidecar.spec if self.sidecar else None
        if sidecar is not None:
            catch_all = [e for e in sidecar.egress if e.port is None]
            scope = catch_all[0].hosts if catch_all else ()
        host, port = self.identity.http_listen
        self.route_tables[DEFAULT_LISTENER] = self.mesh_route_table(DEFAULT_LISTENER, scope)
        self.listeners.append(Listener(DEFAULT_LISTENER, host, port, "HTTP", route_table=DEFAULT_LISTENER))
        if sidecar is None:
            return
        used = {(host, port)}
        for e in sidecar.egress:
            if e.port is None:
                continue
            where = f"{self.sidecar.ref}: spec.egress[{e.index}]"
            address = e.bind or host
            if (address, e.port.number) in used:
                self.warn(f"{where}.port: {address}:{e.port.number} is already used by another listener; ignored")
                continue
            used.add((address, e.port.number))
            name = f"egress_{e.port.number}"
            if _cluster_protocol(e.port.protocol or "TCP") == "TCP":
                routes = self._tcp_routes_for("mesh", e.port.number, self._egress_scope(e.hosts), where)
                self.listeners.append(Listener(name, address, e.port.number, "TCP", tcp_routes=routes))
            else:
                table = self.mesh_route_table(name, e.hosts)
                if sidecar.outbound_mode == "ALLOW_ANY" and table.default is None:
                    table = RouteTable(table.name, table.exact, table.wildcards,
                                       self._passthrough_vhost(e.port.number, where))
                self.route_tables[name] = table
                self.listeners.append(Listener(name, address, e.port.number, "HTTP", route_table=name))
        for ing in sidecar.ingress:
            where = f"{self.sidecar.ref}: spec.ingress[{ing.index}]"
            if ing.default_endpoint.startswith("unix://"):
                self.warn(f"{where}.defaultEndpoint: unix sockets are not supported; listener ignored")
                continue
            target_host, target_port = "127.0.0.1", ing.port.target_port or ing.port.number
            if ing.default_endpoint:
                ep_host, _, ep_port = ing.default_endpoint.rpartition(":")
                target_port = int(ep_port)
                target_host = {"0.0.0.0": "127.0.0.1", "[::]": "::1", "[::1]": "::1"}.get(ep_host, ep_host)
            address = ing.bind or "0.0.0.0"
            if (address, ing.port.number) in used:
                self.warn(f"{where}.port: {address}:{ing.port.number} is already used by another listener; ignored")
                continue
            used.add((address, ing.port.number))
            protocol = _cluster_protocol(ing.port.protocol)
            cname = cluster_name(ing.port.number, None, "", "inbound")
            self.clusters[cname] = Cluster(cname, service="", port=ing.port.number, subset=None,
                                           endpoints=(Endpoint(target_host, target_port),),
                                           protocol=protocol, namespace=self.identity.namespace)
            dest = WeightedDestination("", None, ing.port.number, 100, cname)
            name = f"inbound_{ing.port.number}"
            security = {"authz": self.security.authz, "mtls": self.security.mtls.for_port(target_port)}
            if protocol == "TCP" or protocol == "TLS":
                self.listeners.append(Listener(name, address, ing.port.number, "TCP",
                                               tcp_routes=(TcpRoute((dest,), f"{where}"),), **security))
            else:
                vh = VirtualHost(f"inbound|{ing.port.number}", ("*",),
                                 (HttpRoute(name="", source=where, destinations=(dest,),
                                            timeout=self.settings.default_route_timeout),))
                self.route_tables[name] = RouteTable(name, default=vh)
                self.listeners.append(Listener(name, address, ing.port.number, "HTTP", route_table=name,
                                               **security))

    def _passthrough_vhost(self, port: int, where: str) -> VirtualHost:
        """outboundTrafficPolicy ALLOW_ANY on an explicit HTTP egress listener: a request for a
        host outside the registry goes to the host and port it names (Istio's PassthroughCluster;
        REGISTRY_ONLY leaves such requests without a route: 404 NR)."""
        name = f"PassthroughCluster|{port}"
        self.clusters[name] = Cluster(
            name=name, service="", port=port, subset=None, endpoints=(),
            policy=TrafficPolicy(load_balancer=LoadBalancerPolicy(simple="PASSTHROUGH"),
                                 connection_pool=ConnectionPoolPolicy(
                                     connect_timeout=self.settings.upstream_connect_timeout)),
            protocol="HTTP", resolution="NONE", namespace=self.identity.namespace)
        route = HttpRoute(name="allow_any", source=f"{where}: outboundTrafficPolicy ALLOW_ANY",
                          destinations=(WeightedDestination("", None, port, 100, name),),
                          retries=DEFAULT_RETRY_POLICY, timeout=self.settings.default_route_timeout)
        return VirtualHost("PassthroughCluster", ("*",), (route,))

    def _tcp_routes_for(self, context: str, port: int, in_scope, where: str) -> tuple[TcpRoute, ...]:
        for r in self.by_kind.get("VirtualService", []):
            vs: VirtualService = r.spec
            if not vs.tcp or not self._applies(r, context):
                continue
            if context == "mesh" and not any(in_scope(r.namespace, self.resolve(h, r.namespace)) for h in vs.hosts):
                continue
            routes = self._l4_routes(r, vs.tcp, context, port)
            if routes:
                return routes
        if context != "mesh":
            return ()
        candidates = [s for h, s in self.services.items() if in_scope(s.namespace, h)]
        if len(candidates) == 1:
            svc = candidates[0]
            sp = svc.port(port) or svc.port(None)
            if sp is not None:
                dest = WeightedDestination(svc.host, None, sp.number, 100, cluster_name(sp.number, None, svc.host))
                return (TcpRoute((dest,), f"{svc.origin}: implicit TCP route"),)
        self.warn(f"{where}: no TCP route for port {port} (needs a VirtualService tcp route or exactly one "
                  f"service among the hosts, found {len(candidates)}); connections are closed")
        return ()

    def _l4_routes(self, r: Resource, routes: tuple[L4Route, ...], context: str, port: int) -> tuple[TcpRoute, ...]:
        top = self._gateways_of(r, r.spec.gateways) or ("mesh",)
        out = []
        for t in routes:
            ok = not t.match and context in top
            runtime: list[TcpMatch] | None = []      # per-connection conditions; None = matches every connection
            for m in t.match:
                gws = self._gateways_of(r, m.gateways) or top
                if context in gws and m.port in (None, port) and self._selector_ok(m.source_labels.items(),
                                                                                   m.source_namespace):
                    ok = True
                    if not m.destination_subnets and not m.source_subnet:
                        runtime = None
                    elif runtime is not None:
                        runtime.append(TcpMatch(
                            tuple(ipaddress.ip_network(n, strict=False) for n in m.destination_subnets),
                            ipaddress.ip_network(m.source_subnet, strict=False) if m.source_subnet else None))
            if not ok:
                continue
            where = f"{r.ref}: spec.tcp[{t.index}]"
            single = len(t.route) == 1
            dests = tuple(self.destination(f"{where}.route[{j}].destination", d.destination,
                                           100 if single else (d.weight or 0), r.namespace, port)
                          for j, d in enumerate(t.route))
            out.append(TcpRoute(dests, where, matches=tuple(runtime or ())))
        return tuple(out)

    def _sni_routes(self, servers: list[tuple[Resource, Server]], port: int) -> tuple[TcpRoute, ...]:
        """Gateway PASSTHROUGH: VirtualService ``tls`` routes bound to one of ``servers``, each
        match's ``sniHosts`` narrowed to the server's hosts; first match wins (Istio's order)."""
        out = []
        for r in self.by_kind.get("VirtualService", []):
            vs: VirtualService = r.spec
            if not vs.tls:
                continue
            top = self._gateways_of(r, vs.gateways) or ("mesh",)
            for gr, s in servers:
                context = f"{gr.namespace}/{gr.name}"
                server_hosts = tuple(h.rpartition("/")[2] for h in s.hosts)
                for t in vs.tls:
                    where = f"{r.ref}: spec.tls[{t.index}]"
                    snis = []
                    for m in t.match:
                        gws = self._gateways_of(r, m.gateways) or top
                        if context in gws and m.port in (None, port):
                            snis += [h for h in m.sni_hosts if any(intersect_hosts(sh.lower(), h.lower()) is not None
                                                                   for sh in server_hosts)]
                    if not snis:
                        continue
                    single = len(t.route) == 1
                    dests = tuple(self.destination(f"{where}.route[{j}].destination", d.destination,
                                                   100 if single else (d.weight or 0), r.namespace, port)
                                  for j, d in enumerate(t.route))
                    out.append(TcpRoute(dests, where, tuple(snis)))
        return tuple(out)

    # -- 6. listeners: gateway

    def gateway_listeners(self) -> None:
        servers_by_port: dict[int, list[tuple[Resource, Server]]] = {}
        for r in self.by_kind.get("Gateway", []):
            gw: Gateway = r.spec
            if gw.selector and not self._labels_match(gw.selector):
                continue
            for s in gw.servers:
                servers_by_port.setdefault(s.port.number, []).append((r, s))
        certificates_of: dict[int, list[ServerCertificate]] = {}
        for port, servers in sorted(servers_by_port.items()):
            first_r, first = servers[0]
            protocol = _cluster_protocol(first.port.protocol)
            same = []
            for r, s in servers:
                where = f"{r.ref}: spec.servers[{s.index}]"
                if _cluster_protocol(s.port.protocol) != protocol or (s.tls is not None) != (first.tls is not None) \
                        and protocol != "HTTP":
                    self.warn(f"{where}.port: port {port} is already served as {first.port.protocol} by "
                              f"{first_r.ref}; this server is ignored")
                    continue
                if s.tls is not None and s.tls.mode not in SERVED_TLS_MODES and not s.tls.https_redirect:
                    continue                     # the decoder warned (fields: ServerTLSSettings.mode)
                if protocol == "TLS" and s.tls is not None and first.tls is not None \
                        and (s.tls.mode == "PASSTHROUGH") != (first.tls.mode == "PASSTHROUGH"):
                    what = "passes TLS through" if first.tls.mode == "PASSTHROUGH" else "terminates TLS"
                    self.warn(f"{where}.tls.mode: port {port} already {what} for {first_r.ref} (a port either "
                              "terminates or passes through); this server is ignored")
                    continue
                if _terminates(s):
                    certs = self._server_certificates(r, s, where)
                    if certs is None:
                        continue                 # said why
                    served = [o for _, o in same if _terminates(o)]
                    if served and _tls_options(s.tls) != _tls_options(served[0].tls):
                        self.warn(f"{where}.tls: its TLS versions and cipher suites differ from the first TLS server "
                                  f"on port {port} (a port negotiates them once, before SNI picks the server); "
                                  "this server is not served")
                        continue
                    certificates_of[id(s)] = certs
                same.append((r, s))
            if not same:
                continue
            address = first.bind or self.identity.gateway_bind
            name = f"gateway_{port}"
            if first.tls is not None and first.tls.mode == "PASSTHROUGH":
                routes = self._sni_routes(same, port)
                if not routes:
                    self.warn(f"{first_r.ref}: spec.servers[{first.index}]: no VirtualService tls route is bound "
                              f"to this gateway for port {port}; connections are closed")
                self.listeners.append(Listener(name, address, port, "TCP", tcp_routes=routes,
                                               authz=self.security.authz))
                continue
            if protocol == "TCP" or protocol == "TLS":
                # TLS with SIMPLE / MUTUAL / ...: terminated, then routed as TCP: the tls routes whose
                # sniHosts take the handshake's SNI first, then the tcp routes
                certificates = [c for _, s in same for c in certificates_of.get(id(s), ())]
                routes: tuple[TcpRoute, ...] = self._sni_routes(same, port) if certificates else ()
                for r, s in same:
                    tcp = self._tcp_routes_for(f"{r.namespace}/{r.name}", port, None, f"{r.ref}: spec.servers[{s.index}]")
                    if tcp:
                        routes += tcp
                        break
                if not routes:
                    self.warn(f"{first_r.ref}: spec.servers[{first.index}]: no VirtualService tcp "
                              f"{'or tls ' if certificates else ''}route is bound to this gateway for port {port}")
                self.listeners.append(Listener(name, address, port, "TCP", tcp_routes=routes,
                                               tls=TlsSettings("SIMPLE", tuple(certificates)) if certificates else None,
                                               authz=self.security.authz))
                continue
            tls = None
            certificates = [c for _, s in same for c in certificates_of.get(id(s), ())]
            if certificates:
                tls = TlsSettings("SIMPLE", tuple(certificates))
            table = f"http.{port}"
            self.route_tables[table] = self._gateway_route_table(table, same, port)
            self.listeners.append(Listener(name, address, port, "HTTPS" if tls else "HTTP", route_table=table, tls=tls,
                                           authz=self.security.authz))

    def _server_certificates(self, r: Resource, s: Server, where: str) -> list[ServerCertificate] | None:
        """A terminating server's certificates, one per host (SNI), with its client-certificate
        policy; None (with a warning naming the path) when this proxy cannot serve it: no
        workload certificate for ISTIO_MUTUAL, a credentialName without its Secret."""
        tls = s.tls
        pem = {}
        if tls.mode == "ISTIO_MUTUAL" and not self.identity.workload_certificate:
            self.warn(f"{where}.tls.mode: ISTIO_MUTUAL terminates with the proxy's workload certificate, and this "
                      "proxy has none (run it with --control-plane https://... --token-file); this server is "
                      "not served")
            return None
        if tls.credential_name:
            pem = self._credential(tls, where)
            if pem is None:
                return None
        low, high, suites = _tls_options(tls)
        return [ServerCertificate(
            h.rpartition("/")[2], tls.server_certificate, tls.private_key, low, high, suites, mode=tls.mode,
            ca_certificates=tls.ca_certificates if not pem.get("ca") else "",
            subject_alt_names=tuple(tls.subject_alt_names), spki_sha256=tuple(tls.verify_spki),
            cert_sha256=tuple(tls.verify_hash), credential=pem.get("name", ""),
            certificate_pem=pem.get("cert", b""), key_pem=pem.get("key", b""), ca_pem=pem.get("ca", b""))
            for h in s.hosts]

    def _credential(self, tls, where: str) -> dict | None:
        """``credentialName`` -> the Secret of that name in the gateway proxy's namespace (Istio
        reads the gateway workload's namespace): its certificate and key, and for the MUTUAL
        modes its ``ca.crt`` or else the ``<name>-cacert`` Secret's.  None, with a warning
        naming the path, when something is missing."""
        ns = self.identity.namespace
        secrets = {r.name: r.spec for r in self.by_kind.get("Secret", []) if r.namespace == ns}
        secret = secrets.get(tls.credential_name)
        path = f"{where}.tls.credentialName"
        if secret is None:
            self.warn(f"{path}: no Secret {ns}/{tls.credential_name} (the credential is looked up in the gateway "
                      f"proxy's namespace, {ns}); this server is not served")
            return None
        if secret.withheld:
            self.warn(f"{path}: Secret {ns}/{tls.credential_name} withheld by the control plane: {secret.withheld}; "
                      "this server is not served")
            return None
        if not secret.certificate:
            self.warn(f"{path}: Secret {ns}/{tls.credential_name} has no tls.crt/tls.key (type {secret.type}); "
                      "this server is not served")
            return None
        ca = b""
        if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL") and not tls.ca_certificates:
            ca = secret.ca
            if not ca:
                other = secrets.get(tls.credential_name + "-cacert")
                if other is not None and other.withheld:
                    self.warn(f"{path}: Secret {ns}/{tls.credential_name}-cacert withheld by the control plane: "
                              f"{other.withheld}; this server is not served")
                    return None
                ca = other.ca if other is not None else b""
            if not ca:
                self.warn(f"{path}: mode {tls.mode} needs the CA that client certificates must chain to: no ca.crt "
                          f"in Secret {ns}/{tls.credential_name} and no Secret {ns}/{tls.credential_name}-cacert; "
                          "this server is not served")
                return None
        return {"name": f"{ns}/{tls.credential_name}", "cert": secret.certificate, "key": secret.key, "ca": ca}

    def _gateway_route_table(self, table: str, servers: list[tuple[Resource, Server]], port: int) -> RouteTable:
        per_host: dict[str, list[HttpRoute]] = {}
        names: dict[str, list[str]] = {}
        redirect_hosts: set[str] = set()
        for r in self.by_kind.get("VirtualService", []):
            vs: VirtualService = r.spec
            for gr, s in servers:
                context = f"{gr.namespace}/{gr.name}"
                if not vs.http or not self._applies(r, context):
                    continue
                routes = None
                for raw in vs.hosts:
                    host = self.resolve(raw, r.namespace) if raw != "*" else "*"
                    for spec in s.hosts:
                        ns, _, dns = spec.rpartition("/")
                        if ns not in ("", "*") and (gr.namespace if ns == "." else ns) != r.namespace:
                            continue
                        hit = intersect_hosts(dns.lower(), host)
                        if hit is None:
                            continue
                        if routes is None:
                            routes = self.http_routes(r, context)
                        if s.tls is not None and s.tls.https_redirect:
                            redirect_hosts.add(hit)
                        if f"{r.namespace}/{r.name}" not in names.setdefault(hit, []):
                            names[hit].append(f"{r.namespace}/{r.name}")
                            per_host.setdefault(hit, []).extend(routes)
        exact: dict[str, VirtualHost] = {}
        wildcards: dict[str, VirtualHost] = {}
        default = None
        for host, routes in per_host.items():
            if host in redirect_hosts:
                routes = [HttpRoute(name="https-redirect", source=f"Gateway servers on port {port}: httpsRedirect",
                                    redirect=Redirect(scheme="https", code=301))]
            vh = VirtualHost("+".join(names[host]), (host,), _catch_alls_last(routes))
            if host == "*":
                default = vh
            elif host.startswith("*"):
                wildcards[host[1:]] = vh
            else:
                vh = replace(vh, domains=domains(host, self.identity.namespace, [port]))
                for d in vh.domains:
                    exact.setdefault(d, vh)
        return RouteTable(table, MappingProxyType(exact), _sorted_wildcards(wildcards), default)

    # -- all

    def snapshot(self, version: str | None, resources: list[Resource], workloads_key: str) -> Snapshot:
        if self.identity.mode == "gateway":
            self.gateway_listeners()
        else:
            self.sidecar_listeners()
            if self.identity.inbound and self.identity.capture is None:
                from .capture import add_explicit_inbound
                add_explicit_inbound(self, self.identity.inbound, cluster_name)
            if self.identity.capture is not None:
                from .capture import add_capture_listeners
                self.listeners = [l for l in self.listeners if l.name != DEFAULT_LISTENER]
                add_capture_listeners(self, self.identity.capture, DEFAULT_LISTENER, cluster_name)
        infos = tuple(ResourceInfo(r.kind, r.namespace, r.name, r.source, r.content_hash) for r in resources)
        if version is None:
            blob = json.dumps([sorted((i.kind, i.namespace, i.name, i.version) for i in infos), workloads_key,
                               repr(self.identity), _settings_key(self.settings)], default=str).encode()
            version = hashlib.sha256(blob).hexdigest()[:12]
        return Snapshot(version=version, listeners=tuple(self.listeners),
                        route_tables=MappingProxyType(dict(self.route_tables)),
                        clusters=MappingProxyType(dict(self.clusters)), resources=infos,
                        warnings=tuple(self.warnings), settings=self.settings)


def _settings_key(settings: ProxySettings) -> str:
    # not repr(): compiled, the extension type's repr fails outside the main thread, and
    # snapshots are built in a thread (meshproxy.config.incremental)
    return repr([(name, getattr(settings, name)) for name in sorted(settings.__dataclass_fields__)])


def cluster_endpoints(svc: _Service, port: ServicePort, labels: Mapping[str, str], peer_auth=()
                      ) -> tuple[list[Endpoint], list[tuple[str, int]]]:
    """The endpoints of ``svc`` that a cluster for ``port`` with subset ``labels`` holds, and
    (for DNS resolution) the names to resolve.

    Auto mTLS (Istio's EDS ``mtlsChecker``): an endpoint with a sidecar (label
    ``security.istio.io/tlsMode: istio``) whose workload's PeerAuthentication mode on the port
    it serves is DISABLE loses the label, so clients send it plaintext; PERMISSIVE and STRICT
    keep mTLS.  The mode is resolved for the workload's labels in the service's namespace,
    at its own (container) port, as portLevelMtls keys it."""
    endpoints = []
    dns_hosts = []
    target = port.target_port or port.number
    dns = svc.resolution in ("DNS", "DNS_ROUND_ROBIN")
    modes: dict = {}
    for address, ports, ep_labels, weight, locality in svc.endpoints:
        if labels and any(ep_labels.get(k) != v for k, v in labels.items()):
            continue
        ep_port = ports[port.name] if port.name in ports else target
        if peer_auth and ep_labels.get(TLS_MODE_LABEL) == "istio":
            # a registered workload's entry holds its proxy's port when it has an explicit inbound
            # listener; its own port is the service port's number (the name it registered)
            app_port = target if svc.origin == "workloads" else ep_port
            key = (tuple(sorted(ep_labels.items())), app_port)
            mode = modes.get(key)
            if mode is None:
                mode = modes[key] = resolve_mtls(peer_auth, svc.namespace, ep_labels, ROOT_NAMESPACE).for_port(app_port)
            if mode == DISABLE:
                ep_labels = MappingProxyType({k: v for k, v in ep_labels.items() if k != TLS_MODE_LABEL})
        if dns and not _is_ip(address):
            dns_hosts.append((address, ep_port))
        else:
            endpoints.append(Endpoint(address, ep_port, ep_labels, weight, locality))
    return endpoints, dns_hosts


def _with_port_level(parts: PolicyParts, spec: TrafficPolicySpec, port: int) -> PolicyParts:
    """portLevelSettings replace the four parts whole, without inheriting (Istio)."""
    for number, level in spec.port_level:
        if number == port:
            return level
    return parts


SERVED_TLS_MODES = frozenset({"SIMPLE", "PASSTHROUGH", "MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL"})


def _terminates(s: Server) -> bool:
    """A Gateway server whose TLS this proxy terminates (not PASSTHROUGH, not an HTTP redirect)."""
    return s.tls is not None and not s.tls.https_redirect and s.tls.mode in SERVED_TLS_MODES \
        and s.tls.mode != "PASSTHROUGH"


def _tls_options(tls) -> tuple[str, str, tuple[str, ...]]:
    """(min version, max version, cipher suites) of a Gateway server, TLS_AUTO resolved as
    Envoy resolves it for servers (1.2 .. 1.3)."""
    low = tls.min_protocol_version if tls.min_protocol_version not in ("", "TLS_AUTO") else "TLSV1_2"
    high = tls.max_protocol_version if tls.max_protocol_version not in ("", "TLS_AUTO") else "TLSV1_3"
    return low, high, tuple(tls.cipher_suites)


def _cluster_protocol(protocol: str) -> str:
    p = (protocol or "").upper()
    if p in HTTP_PROTOCOLS:
        return "HTTP"
    if p in ("HTTPS", "TLS"):
        return p
    return "TCP"


def _is_ip(address: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return address.startswith("unix://")


def _single_ip(address: str) -> str:
    """``"10.0.0.1"`` or ``"10.0.0.1/32"`` -> ``"10.0.0.1"``; a range or a non-address -> ``""``."""
    import ipaddress
    try:
        net = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return ""
    return str(net.network_address) if net.num_addresses == 1 else ""


def _sorted_wildcards(wildcards: dict[str, VirtualHost]) -> tuple[tuple[str, VirtualHost], ...]:
    return tuple(sorted(wildcards.items(), key=lambda kv: (-len(kv[0]), kv[0])))


def _is_catch_all(route: HttpRoute) -> bool:
    if not route.matches:
        return True
    for m in route.matches:
        plain = not (m.headers or m.without_headers or m.query_params or m.method or m.authority or m.scheme
                     or m.port)
        uri_all = m.uri is None or (m.uri.kind == "prefix" and m.uri.value == "/") or \
            (m.uri.kind == "regex" and m.uri.value in ("*", ".*"))
        if plain and uri_all:
            return True
    return False


def _catch_alls_last(routes: list[HttpRoute]) -> tuple[HttpRoute, ...]:
    """Istio's SortVHostRoutes: catch-all routes move to the end, others keep their order."""
    return tuple([r for r in routes if not _is_catch_all(r)] + [r for r in routes if _is_catch_all(r)])


def compile_snapshot(resources: Iterable[Resource], identity: ProxyIdentity,
                     settings: ProxySettings = ProxySettings(), workloads: Iterable[WorkloadEndpoint] = (),
                     version: str | None = None, registry: RegistryState | None = None) -> CompileResult:
    """Build the snapshot this proxy runs on.  Never raises for config content: whatever
    cannot be served is reported in ``warnings`` (also in ``Snapshot.warnings``).
    ``registry``: steps 2-4 of an earlier compile for the same identity and settings whose
    ServiceEntries, DestinationRules and ``workloads`` were the same (then only routes and
    listeners are compiled)."""
    resources = list(resources)
    workloads = list(workloads)
    compiler = _Compiler(resources, identity, settings, workloads, registry)
    workloads_key = repr(sorted((w.service, w.namespace, w.address, repr(
        tuple(w.ports) if isinstance(w.ports, (tuple, list)) else dict(w.ports)),
        repr(sorted(dict(w.labels).items())), w.weight, w.vip, w.proxy_port, w.identity)
        for w in workloads)) if version is None else ""
    snapshot = compiler.snapshot(version, resources, workloads_key)
    return CompileResult(snapshot, list(compiler.warnings), compiler.registry)
