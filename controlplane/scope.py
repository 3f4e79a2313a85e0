"""What one proxy needs: a pure function from (all resources, all workloads, identity).

Istio sends every proxy everything unless a ``Sidecar`` narrows it (pain point: sidecar
memory and push size grow with mesh size).  Here the narrowing is the default shape of a push:

* a sidecar gets the VirtualServices bound to the mesh (no ``gateways`` or ``mesh`` in
  them), a gateway proxy gets the Gateways and the VirtualServices bound to a gateway;
* AuthorizationPolicy goes to the proxies of its namespace, and from the root namespace
  (``istio-system``) to every proxy (the proxy decides which select it); PeerAuthentication
  goes to every proxy: a client's auto mTLS needs its destinations' modes (plaintext to a
  workload whose mode is DISABLE, as Istio), its own inbound reads only its namespace's;
* ``exportTo`` is honoured (``*`` everywhere, ``.`` only the object's own namespace);
* the ``Sidecar`` that applies to the proxy (one in its namespace whose ``workloadSelector``
  matches its labels, else the one without a selector in its namespace, else the mesh-wide
  default: the one without a selector in the root namespace ``istio-system``) limits
  VirtualServices, DestinationRules, ServiceEntries and workloads to its ``egress[].hosts``
  (``ns/host``, ``./host``, ``*/host``, ``host`` may be ``*`` or ``*.suffix``), plus what
  those VirtualServices route and mirror to, plus the proxy's own service (a route in scope
  never points at a destination the proxy was not told about);
* discovery selectors (``MeshScope.discovery_namespaces``, the control plane's
  ``--discovery-namespaces``): namespaces outside them are not discovered at all, for any
  proxy (Istio's ``discoverySelectors``).

The trade-off: a narrower scope means smaller pushes, less proxy memory and fewer proxies
woken per change, but a proxy cannot route to a service outside its scope (it answers 503 NR,
or passes the request through as its ``outboundTrafficPolicy`` says) until the Sidecar or
the selectors are changed.  A mesh-wide default Sidecar (``egress: [{hosts: ["./*",
"istio-system/*"]}]`` in ``istio-system``) is the usual large-mesh setting: each namespace
sees itself plus what it declares.

Resources arrive as proxy views (``resources.proxy_view``), sorted, so equal inputs give
equal outputs and therefore equal content hashes.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping

ROOT_NAMESPACE = "istio-system"
SECURITY_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication"})
NOT_GRANTED = "this proxy's identity is not granted Secrets"


@dataclass(frozen=True, slots=True)
class MeshScope:
    """Mesh-wide discovery limits (None = every namespace is discovered)."""
    discovery_namespaces: tuple[str, ...] | None = None     # fnmatch patterns; the root namespace always counts

    def discovers(self, namespace: str) -> bool:
        if self.discovery_namespaces is None or namespace == ROOT_NAMESPACE:
            return True
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.discovery_namespaces)


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str = "default"
    mode: str = "sidecar"                            # "sidecar" | "gateway"
    labels: tuple[tuple[str, str], ...] = ()
    service: str = ""                                # the proxy's own (registered) service, short or FQDN
    # Secrets: set by the control plane from the proxy's authenticated identity, never from what
    # it declares (``from_info`` leaves them at deny)
    secrets_granted: bool = False
    secrets_refusal: str = NOT_GRANTED

    @classmethod
    def from_info(cls, info: Mapping) -> "Identity":
        labels = info.get("labels") or {}
        return cls(str(info.get("namespace") or "default"), str(info.get("mode") or "sidecar"),
                   tuple(sorted((str(k), str(v)) for k, v in labels.items())), str(info.get("service") or ""))


def _ns(obj: dict) -> str:
    return obj["metadata"].get("namespace", "default")


def _exported_to(obj: dict, namespace: str) -> bool:
    export_to = obj["spec"].get("exportTo") or ["*"]
    own = _ns(obj)
    return any(e == "*" or e == namespace or (e == "." and own == namespace) for e in export_to)


def _bound_to_mesh(vs: dict) -> bool:
    gateways = vs["spec"].get("gateways") or []
    return not gateways or "mesh" in gateways


def _bound_to_gateway(vs: dict) -> bool:
    return any(g != "mesh" for g in vs["spec"].get("gateways") or [])


def _selects(sidecar: dict, labels: dict[str, str]) -> bool:
    selector = (sidecar["spec"].get("workloadSelector") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def _short_hosts(host: str, namespace: str) -> set[str]:
    """Every spelling of a host a Sidecar pattern might use."""
    names = {host}
    suffix = f".{namespace}.svc.cluster.local"
    if host.endswith(suffix):
        short = host[: -len(suffix)]
        names |= {short, f"{short}.{namespace}", f"{short}.{namespace}.svc"}
    elif "." not in host:
        names |= {f"{host}.{namespace}.svc.cluster.local", f"{host}.{namespace}"}
    return names


class EgressFilter:
    """The ``egress[].hosts`` of the Sidecar that applies to a proxy (None = allow all)."""

    def __init__(self, patterns: list[tuple[str, str]] | None, proxy_namespace: str):
        self.patterns = patterns
        self.proxy_namespace = proxy_namespace
        patterns = [p for p in patterns or () if p[0] != "~"]
        self._exact = {(ns, host) for ns, host in patterns if "*" not in host}
        self._wild = [(ns, host) for ns, host in patterns if "*" in host]

    def allows(self, namespace: str, hosts: Iterable[str]) -> bool:
        if self.patterns is None:
            return True
        spellings = set()
        for host in hosts:
            spellings |= _short_hosts(host, namespace)
        namespaces = ("*", namespace, ".") if namespace == self.proxy_namespace else ("*", namespace)
        if any((ns, h) in self._exact for ns in namespaces for h in spellings):
            return True
        return any(ns in namespaces and _host_matches(host, h) for ns, host in self._wild for h in spellings)


def applicable_sidecar(resources: list[dict], identity: Identity) -> dict | None:
    """The Sidecar that applies to a sidecar proxy: a selecting one in its namespace, else its
    namespace's default, else the mesh-wide default in the root namespace (Istio's rule)."""
    if identity.mode != "sidecar":
        return None
    labels = dict(identity.labels)
    candidates = [r for r in resources if r["kind"] == "Sidecar" and _ns(r) == identity.namespace
                  and _selects(r, labels)]
    if not candidates:
        candidates = [r for r in resources if r["kind"] == "Sidecar" and _ns(r) == ROOT_NAMESPACE
                      and not (r["spec"].get("workloadSelector") or {}).get("labels")]
    candidates.sort(key=lambda r: (not (r["spec"].get("workloadSelector") or {}).get("labels"),
                                   r["metadata"].get("creationTimestamp") or "\uffff", r["metadata"]["name"]))
    return candidates[0] if candidates else None


def egress_filter(resources: list[dict], identity: Identity) -> EgressFilter:
    sidecar = applicable_sidecar(resources, identity)
    if sidecar is None:
        return EgressFilter(None, identity.namespace)
    candidates = [sidecar]
    patterns = []
    for egress in candidates[0]["spec"].get("egress") or []:
        for entry in egress.get("hosts") or []:
            ns_part, _, host_part = entry.partition("/")
            patterns.append((ns_part, host_part) if host_part else ("*", ns_part))
    return EgressFilter(patterns, identity.namespace)


def _hosts_of(obj: dict) -> list[str]:
    spec = obj["spec"]
    if obj["kind"] == "DestinationRule":
        return [spec.get("host", "")]
    return list(spec.get("hosts") or [])


def fqdn(host: str, namespace: str) -> str:
    if "." not in host and host != "*":
        return f"{host}.{namespace}.svc.cluster.local"
    parts = host.split(".")
    if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):       # name.ns, name.ns.svc
        return f"{parts[0]}.{parts[1]}.svc.cluster.local"
    return host


def _destinations(vs: dict) -> set[str]:
    """Every host a VirtualService routes or mirrors to, as FQDNs."""
    ns = _ns(vs)
    out = set()
    spec = vs["spec"]
    for kind in ("http", "tcp", "tls"):
        for route in spec.get(kind) or []:
            for dest in route.get("route") or []:
                host = (dest.get("destination") or {}).get("host")
                if host:
                    out.add(fqdn(host, ns))
            mirrors = list(route.get("mirrors") or [])
            if route.get("mirror"):
                mirrors.append({"destination": route["mirror"]})
            for mirror in mirrors:
                host = (mirror.get("destination") or {}).get("host")
                if host:
                    out.add(fqdn(host, ns))
    return out


@dataclass(frozen=True, slots=True)
class Scope:
    """What a proxy may see: the egress filter, plus the hosts its routes reach."""
    egress: EgressFilter
    reached: frozenset[str]                    # FQDNs: destinations of in-scope VirtualServices, own service

    def allows(self, namespace: str, hosts: Iterable[str]) -> bool:
        hosts = list(hosts)
        return self.egress.allows(namespace, hosts) or any(fqdn(h, namespace) in self.reached for h in hosts)


def scope_for(resources: list[dict], identity: Identity) -> Scope:
    egress = egress_filter(resources, identity)
    if egress.patterns is None:
        return Scope(egress, frozenset())
    reached = set()
    if identity.service:
        reached.add(fqdn(identity.service, identity.namespace))
    for obj in resources:
        if obj["kind"] == "VirtualService" and _exported_to(obj, identity.namespace) and _bound_to_mesh(obj) \
                and egress.allows(_ns(obj), _hosts_of(obj)):
            reached |= _destinations(obj)
    return Scope(egress, frozenset(reached))


def select_resources(resources: list[dict], identity: Identity, scope: Scope | None = None) -> list[dict]:
    """The resources one proxy needs, in the input's (sorted) order."""
    scope = scope or scope_for(resources, identity)
    sidecar = applicable_sidecar(resources, identity)
    out = []
    credentials = None
    for obj in resources:
        kind = obj["kind"]
        if kind == "Sidecar":
            if obj is sidecar:
                out.append(obj)
            continue
        if kind == "Gateway":
            if identity.mode == "gateway":
                out.append(obj)
            continue
        if kind == "Secret":
            # only to the gateway proxies of its namespace whose Gateways name it (credentialName,
            # or <credentialName>-cacert for the MUTUAL modes), or a DestinationRule's tls does
            # (credentialName and <credentialName>-cacert: an egress gateway's client certificate)
            # and with its data only to an identity granted Secrets (``meshctl serve
            # --secret-readers``); any other gets its name and why, so it can say so
            if identity.mode == "gateway" and _ns(obj) == identity.namespace:
                if credentials is None:
                    credentials = _credentials(resources, dict(identity.labels))
                if obj["metadata"].get("name") in credentials:
                    out.append(obj if identity.secrets_granted else withheld_secret(obj, identity.secrets_refusal))
            continue
        if kind == "PeerAuthentication":
            # every proxy: its own inbound reads those of its namespace (and the root's), and its
            # auto mTLS those of every destination (a workload whose mode is DISABLE gets plaintext)
            out.append(obj)
            continue
        if kind in SECURITY_KINDS:
            # workload policies apply in their namespace, and mesh-wide from the root namespace
            if _ns(obj) in (identity.namespace, ROOT_NAMESPACE):
                out.append(obj)
            continue
        if not _exported_to(obj, identity.namespace):
            continue
        if kind == "VirtualService":
            bound = _bound_to_gateway(obj) if identity.mode == "gateway" else _bound_to_mesh(obj)
            if not bound or not scope.egress.allows(_ns(obj), _hosts_of(obj)):
                continue                     # a route is in scope by the Sidecar's hosts only
        elif not scope.allows(_ns(obj), _hosts_of(obj)):
            continue
        out.append(obj)
    return out


def withheld_secret(secret: dict, reason: str) -> dict:
    """What a proxy not granted ``secret`` is sent instead: its name, type and the reason."""
    from meshproxy.config.decode import WITHHELD_ANNOTATION
    md = secret["metadata"]
    return {"apiVersion": "v1", "kind": "Secret", "type": secret.get("type") or "Opaque",
            "metadata": {"name": md["name"], "namespace": md.get("namespace") or "default",
                         "annotations": {WITHHELD_ANNOTATION: reason}}}


def _credentials(resources: list[dict], labels: dict[str, str]) -> set[str]:
    """The Secret names the Gateways that select a proxy with ``labels`` reference."""
    names: set[str] = set()
    for obj in resources:
        if obj["kind"] != "Gateway":
            continue
        selector = obj["spec"].get("selector") or {}
        if not all(labels.get(k) == v for k, v in selector.items()):
            continue
        for server in obj["spec"].get("servers") or []:
            tls = server.get("tls") if isinstance(server, dict) else None
            name = tls.get("credentialName") if isinstance(tls, dict) else None
            if isinstance(name, str) and name:
                names.add(name)
                if tls.get("mode") in ("MUTUAL", "OPTIONAL_MUTUAL"):
                    names.add(name + "-cacert")
    for obj in resources:
        if obj["kind"] == "DestinationRule" and isinstance(obj.get("spec"), dict):
            names |= _client_credentials(obj["spec"])
    return names


def _client_credentials(spec: dict) -> set[str]:
    """The Secret names a DestinationRule's ``tls.credentialName`` fields reference (each with
    its ``-cacert``), at every level."""
    policies = [spec.get("trafficPolicy")] + [s.get("trafficPolicy") for s in spec.get("subsets") or []
                                              if isinstance(s, dict)]
    names: set[str] = set()
    for policy in policies:
        if not isinstance(policy, dict):
            continue
        for part in [policy] + [p for p in policy.get("portLevelSettings") or [] if isinstance(p, dict)]:
            tls = part.get("tls")
            name = tls.get("credentialName") if isinstance(tls, dict) else None
            if isinstance(name, str) and name:
                names |= {name, name + "-cacert"}
    return names


def select_workloads(workloads: list[dict], resources: list[dict], identity: Identity,
                     scope: Scope | None = None) -> list[dict]:
    scope = scope or scope_for(resources, identity)
    if scope.egress.patterns is None:
        return workloads
    allowed: dict[tuple[str, str], bool] = {}
    out = []
    for w in workloads:
        key = (w["namespace"], w["service"])
        ok = allowed.get(key)
        if ok is None:
            ok = allowed[key] = scope.allows(key[0], [key[1]])
        if ok:
            out.append(w)
    return out
