"""PeerAuthentication: which mTLS mode a workload's inbound port runs in (pure).

Istio's resolution (``pilot/pkg/security/authn/policy_applier.go``):

* Modes ``UNSET`` (inherit), ``DISABLE`` (plaintext only), ``PERMISSIVE`` (mTLS or
  plaintext, decided per connection by peeking at the first bytes), ``STRICT``
  (plaintext refused).  With nothing set at any level the mode is PERMISSIVE.
* Scope: no selector in the root namespace = the mesh; no selector elsewhere = the
  namespace; a selector = the workloads it selects in its namespace.  A selector
  policy in the root namespace is ignored.
* The workload's mode is PERMISSIVE, overridden by the mesh policy, then the
  namespace policy, then the workload policy, each only where it is not UNSET.
  Several policies at one level: the oldest (creationTimestamp) wins.
* ``portLevelMtls`` is read only from the workload policy; keys are the workload's
  (container) ports, and an UNSET entry inherits the workload's resolved mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

UNSET = "UNSET"
DISABLE = "DISABLE"
PERMISSIVE = "PERMISSIVE"
STRICT = "STRICT"
MODES = (UNSET, DISABLE, PERMISSIVE, STRICT)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """One decoded PeerAuthentication."""

    mode: str = UNSET
    selector: Mapping[str, str] | None = None
    port_level: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ScopedPeerAuthentication:
    """A PeerAuthentication with where it lives and how old it is (for precedence)."""

    name: str                      # "namespace/name"
    namespace: str
    created: str                   # RFC 3339 UTC, "" = unknown (sorts after known ones)
    order: int                     # input order, the tie-break
    spec: PeerAuthentication


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    """The resolved mode of one workload: a default and per-port overrides."""

    mode: str = PERMISSIVE
    ports: tuple[tuple[int, str], ...] = ()
    source: str = ""               # which policies decided, for explain and config_dump

    def for_port(self, port: int) -> str:
        for number, mode in self.ports:
            if number == port:
                return mode
        return self.mode


DEFAULT_MTLS = MtlsPolicy(PERMISSIVE, (), "no PeerAuthentication: PERMISSIVE")


def resolve_mtls(policies: Iterable[ScopedPeerAuthentication], namespace: str, labels: Mapping[str, str],
                 root_namespace: str = "istio-system") -> MtlsPolicy:
    """The mode for a workload in ``namespace`` with ``labels``."""
    mesh: list[ScopedPeerAuthentication] = []
    ns_level: list[ScopedPeerAuthentication] = []
    workload: list[ScopedPeerAuthentication] = []
    for p in policies:
        selector = p.spec.selector
        if p.namespace == root_namespace and not selector:
            mesh.append(p)
        elif p.namespace == root_namespace:
            continue                                   # selector policies in the root namespace: ignored
        elif p.namespace != namespace:
            continue
        elif not selector:
            ns_level.append(p)
        elif all(labels.get(k) == v for k, v in selector.items()):
            workload.append(p)
    mode = PERMISSIVE
    sources = []
    chosen_workload = None
    for level, found in (("mesh", mesh), ("namespace", ns_level), ("workload", workload)):
        if not found:
            continue
        oldest = min(found, key=lambda p: (p.created or "\uffff", p.order))
        if level == "workload":
            chosen_workload = oldest
        if oldest.spec.mode != UNSET:
            mode = oldest.spec.mode
            sources.append(f"{level} {oldest.name}: {mode}")
        else:
            sources.append(f"{level} {oldest.name}: UNSET (inherits)")
    ports: tuple[tuple[int, str], ...] = ()
    if chosen_workload is not None:
        ports = tuple((port, mode if m == UNSET else m) for port, m in chosen_workload.spec.port_level)
        if ports:
            sources.append(f"ports {', '.join(f'{p}={m}' for p, m in ports)} from {chosen_workload.name}")
    return MtlsPolicy(mode, ports, "; ".join(sources) or DEFAULT_MTLS.source)
