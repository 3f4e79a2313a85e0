"""What one proxy needs: a pure function from (all resources, all workloads, identity).

Istio sends every proxy everything unless a ``Sidecar`` narrows it (pain point: sidecar
memory grows with mesh size).  Here the narrowing is the default shape of a push:

* a sidecar gets the VirtualServices bound to the mesh (no ``gateways`` or ``mesh`` in
  them), a gateway proxy gets the Gateways and the VirtualServices bound to a gateway;
* AuthorizationPolicy and PeerAuthentication go to the proxies of their namespace, and
  from the root namespace (``istio-system``) to every proxy (the proxy decides which select it);
* ``exportTo`` is honoured (``*`` everywhere, ``.`` only the object's own namespace);
* a ``Sidecar`` in the proxy's namespace whose ``workloadSelector`` matches the proxy's labels
  (or that has none) limits VirtualServices, DestinationRules, ServiceEntries and workloads
  to its ``egress[].hosts`` (``ns/host``, ``./host``, ``*/host``, ``host`` may be ``*`` or
  ``*.suffix``).

Resources arrive as proxy views (``resources.proxy_view``), sorted, so equal inputs give
equal outputs and therefore equal content hashes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

ROOT_NAMESPACE = "istio-system"
SECURITY_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication"})


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str = "default"
    mode: str = "sidecar"                            # "sidecar" | "gateway"
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_info(cls, info: Mapping) -> "Identity":
        labels = info.get("labels") or {}
        return cls(str(info.get("namespace") or "default"), str(info.get("mode") or "sidecar"),
                   tuple(sorted((str(k), str(v)) for k, v in labels.items())))


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


def egress_filter(resources: list[dict], identity: Identity) -> EgressFilter:
    labels = dict(identity.labels)
    candidates = [r for r in resources if r["kind"] == "Sidecar" and _ns(r) == identity.namespace
                  and _selects(r, labels)]
    # a Sidecar with a selector wins over the namespace default (Istio's rule)
    candidates.sort(key=lambda r: (not (r["spec"].get("workloadSelector") or {}).get("labels"),
                                   r["metadata"]["name"]))
    if identity.mode != "sidecar" or not candidates:
        return EgressFilter(None, identity.namespace)
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


def select_resources(resources: list[dict], identity: Identity) -> list[dict]:
    """The resources one proxy needs, in the input's (sorted) order."""
    egress = egress_filter(resources, identity)
    labels = dict(identity.labels)
    out = []
    for obj in resources:
        kind = obj["kind"]
        if kind == "Sidecar":
            if identity.mode == "sidecar" and _ns(obj) == identity.namespace and _selects(obj, labels):
                out.append(obj)
            continue
        if kind == "Gateway":
            if identity.mode == "gateway":
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
            if not bound:
                continue
        if not egress.allows(_ns(obj), _hosts_of(obj)):
            continue
        out.append(obj)
    return out


def select_workloads(workloads: list[dict], resources: list[dict], identity: Identity) -> list[dict]:
    egress = egress_filter(resources, identity)
    if egress.patterns is None:
        return workloads
    allowed: dict[tuple[str, str], bool] = {}
    out = []
    for w in workloads:
        key = (w["namespace"], w["service"])
        ok = allowed.get(key)
        if ok is None:
            ok = allowed[key] = egress.allows(key[0], [key[1]])
        if ok:
            out.append(w)
    return out
