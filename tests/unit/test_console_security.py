"""The console's live view of identities and mTLS: edges from the sidecars' Prometheus text,
and certificate expiry as meshctl prints it."""
from controlplane.cli import cert_expiry
from controlplane.delivery.console import edges, parse_security

TEXT = """\
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",source_principal="spiffe://cluster.local/ns/default/sa/ingress-gateway",connection_security_policy="mutual_tls",response_code="200"} 90
istio_requests_total{reporter="destination",source_principal="spiffe://cluster.local/ns/default/sa/ingress-gateway",connection_security_policy="mutual_tls",response_code="503"} 2
istio_requests_total{reporter="destination",source_principal="unknown",connection_security_policy="none",response_code="200"} 3
istio_requests_total{reporter="source",source_principal="spiffe://cluster.local/ns/default/sa/demo",connection_security_policy="unknown",response_code="200"} 50
# TYPE meshproxy_workload_cert_expiry_timestamp_seconds gauge
meshproxy_workload_cert_expiry_timestamp_seconds{identity="spiffe://cluster.local/ns/default/sa/demo"} 1.8e9
# TYPE meshproxy_workload_cert_valid gauge
meshproxy_workload_cert_valid{identity="spiffe://cluster.local/ns/default/sa/demo"} 1
# TYPE meshproxy_workload_cert_renewal_failing gauge
meshproxy_workload_cert_renewal_failing{identity="spiffe://cluster.local/ns/default/sa/demo"} 0
# TYPE meshproxy_tls_handshake_failures_total counter
meshproxy_tls_handshake_failures_total{listener="inbound_1",reason="plaintext_refused"} 4
# TYPE meshproxy_authz_decisions_total counter
meshproxy_authz_decisions_total{listener="inbound_1",protocol="http",decision="denied",policy=""} 2
meshproxy_authz_decisions_total{listener="inbound_1",protocol="http",decision="allowed",policy="default/p"} 7
"""
GW = "spiffe://cluster.local/ns/default/sa/ingress-gateway"


def test_parse_security_reads_callers_refusals_and_denials_of_one_proxy():
    got = parse_security(TEXT)
    assert got["inbound"] == {(GW, "mutual_tls"): 92, ("unknown", "none"): 3}      # reporter=source is not inbound
    assert got["refused"] == {"plaintext_refused": 4}
    assert got["denied"] == 2
    assert got["certificate"] == {"expiresAt": 1.8e9, "valid": 1.0, "renewalFailing": 0.0}
    assert parse_security("")["certificate"] == {}


def test_edges_give_rates_between_two_readings_and_totals_and_mark_plaintext():
    before = {"a:1": (None, {"node": "v1", "inbound": {(GW, "mutual_tls"): 50}, "refused": {}, "denied": 0})}
    after = {"a:1": (None, {"node": "v1", **parse_security(TEXT)})}
    got = edges(before, after, 2.0)
    assert got == [
        {"destination": "v1", "source": GW, "mutualTls": True, "requestsPerSecond": 21.0, "requests": 92},
        {"destination": "v1", "source": "unknown", "mutualTls": False, "requestsPerSecond": 1.5, "requests": 3},
        {"destination": "v1", "source": None, "refused": {"plaintext_refused": 4}, "denied": 2}]


def test_cert_expiry_shows_the_time_left_or_expired():
    assert cert_expiry({"cert_expires_at": 90_000.0}, now=3_600.0) == "1970-01-02T01:00:00Z (in 24h00m)"
    assert cert_expiry({"cert_expires_at": 90_000.0}, now=90_001.0) == "1970-01-02T01:00:00Z (expired)"
    assert cert_expiry({"cert_not_after": "garbled"}) == "garbled"
    assert cert_expiry({}) == "-"
