"""Which security policies apply to this proxy's workload (a step of the compiler).

:func:`workload_security` picks, from the decoded AuthorizationPolicies and
PeerAuthentications, those that select the workload the proxy runs for (its namespace
and labels, :class:`~meshproxy.config.compile.ProxyIdentity`), and resolves them into what
the listeners carry: one :class:`~meshproxy.security.authz.PolicySet` and one
:class:`~meshproxy.security.peer_authn.MtlsPolicy`.

AuthorizationPolicy scope (Istio): a policy in the root namespace applies mesh-wide, one
elsewhere to its namespace; ``selector.matchLabels`` narrows it to the workloads whose
labels match; ``targetRefs`` (a Kubernetes Gateway, decode refuses other kinds) select the
gateway proxy labelled ``gateway.networking.k8s.io/gateway-name: <name>`` in the policy's
namespace, and such a policy applies to nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ..security.authz import ALLOW, AUDIT, DENY, AppliedPolicy, AuthorizationPolicy, PolicySet
from ..security.peer_authn import MtlsPolicy, PeerAuthentication, ScopedPeerAuthentication, resolve_mtls
from .decode_security import DRY_RUN_ANNOTATION
from .model import UpstreamTls
from .resources import Resource

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


@dataclass(frozen=True, slots=True)
class WorkloadSecurity:
    authz: PolicySet | None
    mtls: MtlsPolicy


def _selects(policy: AuthorizationPolicy, r: Resource, namespace: str, labels: Mapping[str, str],
             root_namespace: str) -> bool:
    if policy.target_refs:
        return r.namespace == namespace and any(
            kind == "Gateway" and labels.get(GATEWAY_NAME_LABEL) == name for _, kind, _, name in policy.target_refs)
    if r.namespace != root_namespace and r.namespace != namespace:
        return False
    return all(labels.get(k) == v for k, v in (policy.selector or {}).items())


def peer_authentications(resources: Iterable[Resource]) -> tuple[ScopedPeerAuthentication, ...]:
    """Every PeerAuthentication of ``resources`` (oldest first, the compiler's order), with
    what precedence needs: what the proxy's own inbound resolves, and what its auto mTLS
    resolves for each destination workload."""
    return tuple(ScopedPeerAuthentication(f"{r.namespace}/{r.name}", r.namespace, r.creation_timestamp, order, r.spec)
                 for order, r in enumerate(resources) if r.kind == "PeerAuthentication")


def workload_security(resources: Iterable[Resource], namespace: str, labels: Mapping[str, str],
                      root_namespace: str) -> WorkloadSecurity:
    """``resources`` oldest first (the compiler's order)."""
    by_action: dict[str, list[AppliedPolicy]] = {ALLOW: [], DENY: [], AUDIT: []}
    peer: list[ScopedPeerAuthentication] = []
    for order, r in enumerate(resources):
        if r.kind == "AuthorizationPolicy":
            policy: AuthorizationPolicy = r.spec
            if _selects(policy, r, namespace, labels, root_namespace):
                dry_run = r.annotations.get(DRY_RUN_ANNOTATION, "").lower() == "true"
                by_action[policy.action].append(
                    AppliedPolicy(f"{r.namespace}/{r.name}", policy.action, policy.rules, dry_run))
        elif r.kind == "PeerAuthentication":
            spec: PeerAuthentication = r.spec
            peer.append(ScopedPeerAuthentication(f"{r.namespace}/{r.name}", r.namespace, r.creation_timestamp,
                                                 order, spec))
    policies = PolicySet(deny=tuple(by_action[DENY]), allow=tuple(by_action[ALLOW]), audit=tuple(by_action[AUDIT]))
    return WorkloadSecurity(policies if policies else None, resolve_mtls(peer, namespace, labels, root_namespace))


ISTIO_HTTP_ALPN = ("istio-http/1.1", "istio", "http/1.1")
ISTIO_TCP_ALPN = ("istio-peer-exchange", "istio")


def upstream_tls(tls, host: str, port: int, subset: str | None, protocol: str, identities=()):
    """DestinationRule ``tls`` (decoded ClientTLS) -> the cluster's UpstreamTls (None = plaintext).

    ISTIO_MUTUAL gets Istio's SNI ``outbound_.<port>_.<subset>_.<host>`` unless ``sni`` is
    set, and Istio's ALPN (``istio-http/1.1``... for HTTP, ``istio-peer-exchange`` for TCP),
    which an inbound PERMISSIVE port reads as mTLS."""
    if tls is None or tls.mode == "DISABLE":
        return None
    # SIMPLE/MUTUAL without sni: the service's host name (what the server's certificate names)
    sni = tls.sni or (host if tls.mode != "ISTIO_MUTUAL" and not host.startswith("*") else "")
    alpn: tuple[str, ...] = ()
    sans = tuple(tls.subject_alt_names)
    if tls.mode == "ISTIO_MUTUAL":
        sni = sni or istio_sni(host, port, subset)
        alpn = ISTIO_TCP_ALPN if protocol == "TCP" else ISTIO_HTTP_ALPN
        sans = sans or tuple(dict.fromkeys(identities))
    return UpstreamTls(mode=tls.mode, sni=sni, subject_alt_names=sans,
                       ca_certificates=tls.ca_certificates, client_certificate=tls.client_certificate,
                       private_key=tls.private_key, insecure_skip_verify=tls.insecure_skip_verify, alpn=alpn)


TRUST_DOMAIN = "cluster.local"


def spiffe_id(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def istio_sni(host: str, port: int, subset: str | None) -> str:
    return f"outbound_.{port}_.{subset or ''}_.{host}"


def auto_mtls(host: str, port: int, subset: str | None, protocol: str, identities) -> UpstreamTls:
    """Istio's auto mTLS for a cluster without DestinationRule tls: ISTIO_MUTUAL to the
    endpoints labelled ``security.istio.io/tlsMode: istio`` (they have a sidecar), plaintext to
    the others; the server must be one of the service's identities (any SPIFFE id when
    none is known).  A proxy without a workload certificate sends plaintext (upstream/tls.py)."""
    return UpstreamTls(mode="ISTIO_MUTUAL", sni=istio_sni(host, port, subset),
                       subject_alt_names=tuple(dict.fromkeys(identities)),
                       alpn=ISTIO_TCP_ALPN if protocol == "TCP" else ISTIO_HTTP_ALPN, auto=True)
