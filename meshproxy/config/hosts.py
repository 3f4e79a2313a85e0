"""Host names as Kubernetes users expect them.

* A short name resolves against the namespace of the resource that wrote it:
  ``reviews`` in namespace ``default`` -> ``reviews.default.svc.cluster.local``.
* ``reviews.prod`` and ``reviews.prod.svc`` complete to the cluster-local FQDN when that
  service is known (the DNS search path a pod has); other dotted names are used as given.
* Every name is lower-cased; wildcards (``*.example.com``) are kept as written.

:func:`domains` gives every alias under which a Host header reaches a cluster-local
service: ``reviews.default``, ``reviews.default.svc``, the FQDN, and the bare ``reviews``
only for the proxy's own namespace, each also with ``:port``.
"""
from __future__ import annotations

from typing import Collection, Iterable

CLUSTER_SUFFIX = ".svc.cluster.local"


def resolve_host(host: str, namespace: str, known: Collection[str] = ()) -> str:
    h = host.strip().lower().rstrip(".")
    if h.startswith("*") or _is_ip(h):
        return h
    if "." not in h:
        return f"{h}.{namespace}{CLUSTER_SUFFIX}"
    if h.endswith(".svc"):
        return h + ".cluster.local"
    if h not in known and h.count(".") == 1 and h + CLUSTER_SUFFIX in known:
        return h + CLUSTER_SUFFIX
    return h


def _is_ip(h: str) -> bool:
    return h.replace(".", "").isdigit() or ":" in h


def split_cluster_local(fqdn: str) -> tuple[str, str] | None:
    """``reviews.default.svc.cluster.local`` -> ("reviews", "default"); None for other names."""
    if not fqdn.endswith(CLUSTER_SUFFIX):
        return None
    parts = fqdn[: -len(CLUSTER_SUFFIX)].split(".")
    if len(parts) != 2:
        return None
    return parts[0], parts[1]


def domains(fqdn: str, proxy_namespace: str, ports: Iterable[int] = ()) -> tuple[str, ...]:
    """Every Host (with and without ``:port``) that should reach ``fqdn``."""
    names: list[str] = []
    local = split_cluster_local(fqdn)
    if local is not None:
        name, ns = local
        if ns == proxy_namespace:
            names.append(name)
        names += [f"{name}.{ns}", f"{name}.{ns}.svc", fqdn]
    else:
        names.append(fqdn)
    out = list(names)
    for port in ports:
        out += [f"{n}:{port}" for n in names]
    return tuple(dict.fromkeys(out))


def host_covers(pattern: str, host: str) -> bool:
    """Does ``pattern`` (exact name, ``*suffix`` or ``*``) include ``host``?  A wildcard
    host is included when its own suffix lies inside the pattern's."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):                  # "*.example.com", or Istio's "*x.example.com"
        suffix = pattern[1:]
        return host == pattern or host.endswith(suffix) and len(host) > len(suffix)
    return pattern == host


def intersect_hosts(a: str, b: str) -> str | None:
    """The more specific of two host patterns when one includes the other, else None."""
    if host_covers(a, b):
        return b
    if host_covers(b, a):
        return a
    return None


def namespaced_host_matches(spec: str, default_ns: str, namespace: str, host: str) -> bool:
    """Sidecar egress / Gateway server host ``ns/dnsName``: does it select ``host`` of
    ``namespace``?  ``*`` = any namespace, ``.`` = ``default_ns``, ``~`` = none; a spec
    without ``/`` means any namespace."""
    ns, slash, dns = spec.rpartition("/")
    if not slash:
        ns = "*"
    if ns == "~":
        return False
    if ns == ".":
        ns = default_ns
    if ns != "*" and ns != namespace:
        return False
    return intersect_hosts(dns.lower(), host) is not None
