"""DestinationRule tls and auto mTLS as compiled: which endpoints originate what TLS."""
from __future__ import annotations

import textwrap

import yaml

from meshproxy.config.compile import ProxyIdentity, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.model import endpoint_tls
from meshproxy.config.resources import Document


def _compile(text: str):
    decoded = decode_documents([Document("t.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(textwrap.dedent(text)))])
    return decoded, (compile_snapshot(decoded.resources, ProxyIdentity()).snapshot if not decoded.errors else None)


SE = textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: reviews, namespace: default}
    spec:
      hosts: [reviews.default.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      subjectAltNames: ["spiffe://cluster.local/ns/default/sa/reviews-legacy"]
      ports: [{number: 9080, name: http, protocol: HTTP}]
      endpoints:
      - {address: 10.0.0.1, labels: {security.istio.io/tlsMode: istio, version: v1}, serviceAccount: reviews}
      - {address: 10.0.0.2, labels: {version: v1}}
    """)


def test_auto_mtls_only_for_endpoints_with_a_sidecar_and_checks_the_services_identities():
    _, snap = _compile(SE)
    cluster = snap.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    with_sidecar, without = cluster.endpoints
    tls = endpoint_tls(cluster.policy, with_sidecar)
    assert tls.mode == "ISTIO_MUTUAL" and tls.auto
    assert tls.sni == "outbound_.9080_._.reviews.default.svc.cluster.local"
    assert tls.subject_alt_names == ("spiffe://cluster.local/ns/default/sa/reviews-legacy",
                                     "spiffe://cluster.local/ns/default/sa/reviews")
    assert tls.alpn == ("istio-http/1.1", "istio", "http/1.1")
    assert endpoint_tls(cluster.policy, without) is None


def test_destination_rule_tls_wins_and_disable_turns_auto_mtls_off():
    dr = """\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: %s}}
          subsets:
          - name: v1
            labels: {version: v1}
            trafficPolicy: {tls: {mode: SIMPLE, sni: reviews.example.com}}
        """
    _, snap = _compile(SE + textwrap.dedent(dr % "DISABLE"))
    top = snap.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    assert all(endpoint_tls(top.policy, ep) is None for ep in top.endpoints)
    v1 = snap.clusters["outbound|9080|v1|reviews.default.svc.cluster.local"]
    assert {endpoint_tls(v1.policy, ep).sni for ep in v1.endpoints} == {"reviews.example.com"}
    _, snap = _compile(SE + textwrap.dedent(dr % "ISTIO_MUTUAL"))
    top = snap.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    tls = {endpoint_tls(top.policy, ep) for ep in top.endpoints}
    assert len(tls) == 1 and next(iter(tls)).mode == "ISTIO_MUTUAL" and not next(iter(tls)).auto


def test_client_crl_is_refused_and_credential_name_on_a_sidecar_warned_not_dropped():
    decoded, _ = _compile(SE + textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: MUTUAL, credentialName: reviews-client, caCrl: /etc/crl.pem}}
        """))
    assert any("spec.trafficPolicy.tls.caCrl: certificate revocation lists are not checked" in e for e in decoded.errors)
    decoded, snap = _compile(SE + textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: MUTUAL, credentialName: reviews-client}}
        """))
    assert not decoded.errors
    assert any("DestinationRule default/reviews: spec.trafficPolicy.tls.credentialName: applies on gateways" in w
               for w in snap.warnings), snap.warnings


def test_a_workload_registered_with_an_identity_gets_auto_mtls_checked_against_it():
    from meshproxy.config.compile import WorkloadEndpoint
    snap = compile_snapshot([], ProxyIdentity(), workloads=[
        WorkloadEndpoint("ratings", "default", "10.0.0.7", {"http": 9080}, proxy_port=15006,
                         identity="spiffe://cluster.local/ns/default/sa/ratings"),
        WorkloadEndpoint("ratings", "default", "10.0.0.8", {"http": 9080})]).snapshot
    cluster = snap.clusters["outbound|9080||ratings.default.svc.cluster.local"]
    meshed, plain = cluster.endpoints
    assert endpoint_tls(cluster.policy, meshed).subject_alt_names == ("spiffe://cluster.local/ns/default/sa/ratings",)
    assert endpoint_tls(cluster.policy, plain) is None

