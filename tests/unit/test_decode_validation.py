"""One test per validation rule; each asserts the exact error line with its field path."""
from __future__ import annotations

import pytest
import yaml

from meshproxy.config.decode import decode_documents
from meshproxy.config.resources import Document

ROUTE = {"route": [{"destination": {"host": "reviews"}}]}


def decode(kind: str, spec, name: str = "r", namespace: str = "default", **metadata):
    body = {"apiVersion": "networking.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, **metadata}, "spec": spec}
    return decode_documents([Document("test.yaml", 0, body)])


def vs_errors(http=None, **spec):
    spec.setdefault("hosts", ["reviews"])
    if http is not None:
        spec["http"] = http
    return decode("VirtualService", spec).errors


def http_route(**fields):
    return [{**ROUTE, **fields}]


P = "VirtualService default/r: spec.http[0]"

CASES = [
    # weights
    ("negative weight", [{}, {"route": [{"destination": {"host": "a"}, "weight": 10},
                                        {"destination": {"host": "b"}, "weight": -5}]}],
     "VirtualService default/r: spec.http[1].route[1].weight: must be >= 0, got -5"),
    ("weights summing to zero", [{"route": [{"destination": {"host": "a"}, "weight": 0},
                                            {"destination": {"host": "b"}, "weight": 0}]}],
     f"{P}.route: total weight must be > 0 when there is more than one destination"),
    ("destination without host", [{"route": [{"destination": {"subset": "v1"}}]}],
     f"{P}.route[0].destination.host: required"),
    ("destination port out of range", [{"route": [{"destination": {"host": "a", "port": {"number": 70000}}}]}],
     f"{P}.route[0].destination.port.number: must be <= 65535, got 70000"),
    # durations
    ("malformed timeout", http_route(timeout="10 seconds"),
     f"{P}.timeout: must be a duration like \"1.5s\", \"500ms\" or \"1m\", got '10 seconds'"),
    ("timeout below 1ms", http_route(timeout="100us"), f"{P}.timeout: must be >= 1ms, got '100us'"),
    # action combinations
    ("route with redirect", http_route(redirect={"uri": "/x"}), f"{P}: route and redirect cannot be used together"),
    ("route with directResponse", http_route(directResponse={"status": 503}),
     f"{P}: route and directResponse cannot be used together"),
    ("redirect with directResponse", [{"redirect": {"uri": "/x"}, "directResponse": {"status": 200}}],
     f"{P}: redirect and directResponse cannot be used together"),
    ("no action", [{"match": [{"uri": {"prefix": "/"}}]}],
     f"{P}: one of route, redirect, directResponse or delegate is required"),
    ("fault with redirect", [{"redirect": {"uri": "/x"}, "fault": {"abort": {"httpStatus": 500}}}],
     f"{P}: fault and redirect cannot be used together"),
    ("redirect code", [{"redirect": {"uri": "/x", "redirectCode": 200}}],
     f"{P}.redirect.redirectCode: must be >= 300, got 200"),
    ("direct response status", [{"directResponse": {"status": 42}}],
     f"{P}.directResponse.status: must be >= 200, got 42"),
    # StringMatch
    ("two kinds in one StringMatch", http_route(match=[{"uri": {"exact": "/a", "prefix": "/b"}}]),
     f"{P}.match[0].uri: exactly one of exact, prefix, regex is allowed, got exact, prefix"),
    ("empty uri StringMatch", http_route(match=[{"uri": {}}]),
     f"{P}.match[0].uri: exactly one of exact, prefix, regex is required"),
    ("regex that does not compile", http_route(match=[{"uri": {"regex": "/api/(v1"}}]),
     f"{P}.match[0].uri.regex: invalid regular expression '/api/(v1': missing ), unterminated subpattern at position 5"),
    ("upper-case header name", http_route(match=[{"headers": {"End-User": {"exact": "jason"}}}]),
     f"{P}.match[0].headers.End-User: header name must be lower-case (\"end-user\")"),
    ("null header match", http_route(match=[{"headers": {"end-user": None}}]),
     f"{P}.match[0].headers.end-user: header match cannot be null (use {{}} to match presence)"),
    # retries
    ("unknown retryOn token", http_route(retries={"attempts": 3, "retryOn": "5xx,sometimes"}),
     f"{P}.retries.retryOn: 'sometimes' is not a known retry condition or status code"),
    ("negative attempts", http_route(retries={"attempts": -1}), f"{P}.retries.attempts: must be >= 0, got -1"),
    ("attempts 0 with other fields", http_route(retries={"attempts": 0, "perTryTimeout": "1s"}),
     f"{P}.retries: attempts is 0 (retries disabled) but other retry fields are set"),
    # fault
    ("fault without delay or abort", http_route(fault={}), f"{P}.fault: must have delay or abort"),
    ("percentage above 100", http_route(fault={"abort": {"httpStatus": 500, "percentage": {"value": 150}}}),
     f"{P}.fault.abort.percentage.value: must be 0 or in [0.0001, 100], got 150"),
    ("tiny percentage", http_route(fault={"abort": {"httpStatus": 500, "percentage": {"value": 0.00001}}}),
     f"{P}.fault.abort.percentage.value: must be 0 or in [0.0001, 100], got 1e-05"),
    ("abort status out of range", http_route(fault={"abort": {"httpStatus": 600}}),
     f"{P}.fault.abort.httpStatus: must be <= 599, got 600"),
    ("exponential delay", http_route(fault={"delay": {"exponentialDelay": "1s"}}),
     f"{P}.fault.delay.exponentialDelay: not supported"),
    ("unknown grpc status", http_route(fault={"abort": {"grpcStatus": "NOPE"}}),
     f"{P}.fault.abort.grpcStatus: must be one of ABORTED|ALREADY_EXISTS|CANCELLED|DATA_LOSS|DEADLINE_EXCEEDED|"
     "FAILED_PRECONDITION|INTERNAL|INVALID_ARGUMENT|NOT_FOUND|OK|OUT_OF_RANGE|PERMISSION_DENIED|"
     "RESOURCE_EXHAUSTED|UNAUTHENTICATED|UNAVAILABLE|UNIMPLEMENTED|UNKNOWN, got 'NOPE'"),
    # mirror
    ("mirror and mirrors", http_route(mirror={"host": "a"}, mirrors=[{"destination": {"host": "b"}}]),
     f"{P}: mirror and mirrors cannot be used together"),
    # unknown field with hint
    ("typo in weight", [{"route": [{"destination": {"host": "a"}, "wieght": 10}]}],
     f"{P}.route[0].wieght: unknown field (did you mean \"weight\"?)"),
]


@pytest.mark.parametrize("http,expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_virtual_service_rule_reports_exact_path(http, expected):
    errors = vs_errors(http)
    assert expected in errors, errors


def test_all_errors_of_a_resource_are_collected_not_just_the_first():
    errors = vs_errors([{"route": [{"destination": {"host": "a"}, "weight": -1},
                                   {"destination": {"host": "b"}, "weight": -2}], "timeout": "soon"}])
    assert errors == [
        f"{P}.route[0].weight: must be >= 0, got -1",
        f"{P}.route[1].weight: must be >= 0, got -2",
        f"{P}.route: total weight must be > 0 when there is more than one destination",
        f"{P}.timeout: must be a duration like \"1.5s\", \"500ms\" or \"1m\", got 'soon'",
    ]


def test_weights_need_not_sum_to_100():
    assert vs_errors([{"route": [{"destination": {"host": "a"}, "weight": 1},
                                 {"destination": {"host": "b"}, "weight": 2}]}]) == []


def test_go_style_durations_are_accepted():
    for text, seconds in (("1.5s", 1.5), ("500ms", 0.5), ("1m", 60.0), ("1h30m", 5400.0), ("1ms", 0.001)):
        result = decode("VirtualService", {"hosts": ["a"], "http": http_route(timeout=text)})
        assert result.errors == [] and result.resources[0].spec.http[0].timeout == seconds


def test_unknown_top_level_and_spec_fields_are_errors():
    body = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "r"},
            "spec": {"hosts": ["a"], "http": [ROUTE], "gatways": ["x"]}, "extra": 1}
    errors = decode_documents([Document("f.yaml", 0, body)]).errors
    assert errors == ["VirtualService default/r: extra: unknown field",
                      "VirtualService default/r: spec.gatways: unknown field (did you mean \"gateways\"?)"]


def test_metadata_name_is_required_and_unknown_kind_is_unsupported():
    body = {"apiVersion": "networking.istio.io/v1", "kind": "EnvoyFilter", "metadata": {"name": "f"}, "spec": {}}
    assert decode_documents([Document("f.yaml", 0, body)]).errors == [
        "EnvoyFilter default/f: kind: unsupported kind 'EnvoyFilter' "
        "(supported: VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar, AuthorizationPolicy, "
        "PeerAuthentication, Secret)"]
    assert decode("DestinationRule", {"host": "a"}, name=None).errors[0] == \
        "DestinationRule default/?: metadata.name: required"


def test_kubernetes_metadata_fields_are_accepted():
    result = decode("DestinationRule", {"host": "a"}, uid="x", generation=3, resourceVersion="7",
                    labels={"app": "a"}, annotations={"k": "v"}, creationTimestamp="2024-05-01T10:00:00Z")
    assert result.errors == []
    assert result.resources[0].creation_timestamp == "2024-05-01T10:00:00Z"


def test_star_host_is_refused_for_a_mesh_virtual_service():
    assert vs_errors([ROUTE], hosts=["*"]) == ['VirtualService default/r: spec.hosts[0]: "*" is not allowed here']
    assert decode("VirtualService", {"hosts": ["*"], "gateways": ["gw"], "http": [ROUTE]}).errors == []


def test_overlapping_hosts_in_one_virtual_service_are_errors():
    assert vs_errors([ROUTE], hosts=["*.foo.com", "a.foo.com"]) == [
        "VirtualService default/r: spec.hosts[1]: 'a.foo.com' duplicates or overlaps spec.hosts[0] '*.foo.com'"]


def test_virtual_service_needs_http_tcp_or_tls():
    assert decode("VirtualService", {"hosts": ["a"]}).errors == [
        "VirtualService default/r: spec: one of http, tcp or tls must be provided"]


def dr_errors(policy=None, **spec):
    spec.setdefault("host", "reviews")
    if policy is not None:
        spec["trafficPolicy"] = policy
    return decode("DestinationRule", spec).errors


D = "DestinationRule default/r: spec.trafficPolicy"

DR_CASES = [
    ("unknown simple lb", {"loadBalancer": {"simple": "FASTEST"}},
     f"{D}.loadBalancer.simple: must be one of LEAST_CONN|LEAST_REQUEST|PASSTHROUGH|RANDOM|ROUND_ROBIN|UNSPECIFIED, "
     "got 'FASTEST'"),
    ("two consistent hash keys", {"loadBalancer": {"consistentHash": {"httpHeaderName": "x", "useSourceIp": True}}},
     f"{D}.loadBalancer.consistentHash: exactly one of httpHeaderName, httpCookie, useSourceIp, "
     "httpQueryParameterName is required, got httpHeaderName, useSourceIp"),
    ("no consistent hash key", {"loadBalancer": {"consistentHash": {}}},
     f"{D}.loadBalancer.consistentHash: exactly one of httpHeaderName, httpCookie, useSourceIp, "
     "httpQueryParameterName is required"),
    ("cookie without name", {"loadBalancer": {"consistentHash": {"httpCookie": {"ttl": "10s"}}}},
     f"{D}.loadBalancer.consistentHash.httpCookie.name: required"),
    ("maglev table not prime", {"loadBalancer": {"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 100}}}},
     f"{D}.loadBalancer.consistentHash.maglev.tableSize: must be a prime number, got 100"),
    ("max ejection percent", {"outlierDetection": {"maxEjectionPercent": 101}},
     f"{D}.outlierDetection.maxEjectionPercent: must be <= 100, got 101"),
    ("negative consecutive errors", {"outlierDetection": {"consecutive5xxErrors": -1}},
     f"{D}.outlierDetection.consecutive5xxErrors: must be >= 0, got -1"),
    ("outlier interval", {"outlierDetection": {"interval": "0s"}},
     f"{D}.outlierDetection.interval: must be >= 1ms, got '0s'"),
    ("local origin failures need split", {"outlierDetection": {"consecutiveLocalOriginFailures": 3}},
     f"{D}.outlierDetection.consecutiveLocalOriginFailures: requires splitExternalLocalOriginErrors: true"),
    ("negative max connections", {"connectionPool": {"tcp": {"maxConnections": -1}}},
     f"{D}.connectionPool.tcp.maxConnections: must be >= 0, got -1"),
    ("empty traffic policy", {}, f"{D}: must set at least one field"),
    ("locality weights", {"loadBalancer": {"localityLbSetting": {"distribute": [{"from": "a/*", "to": {"a/*": 50}}]}}},
     f"{D}.loadBalancer.localityLbSetting.distribute[0].to: weights must total 100, got 50"),
    ("port level without port", {"portLevelSettings": [{"loadBalancer": {"simple": "RANDOM"}}]},
     f"{D}.portLevelSettings[0].port: required"),
]


@pytest.mark.parametrize("policy,expected", [(c[1], c[2]) for c in DR_CASES], ids=[c[0] for c in DR_CASES])
def test_destination_rule_rule_reports_exact_path(policy, expected):
    errors = dr_errors(policy)
    assert expected in errors, errors


def test_duplicate_subset_names_are_errors():
    errors = dr_errors(subsets=[{"name": "v1", "labels": {"version": "v1"}}, {"name": "v1"}])
    assert errors == ["DestinationRule default/r: spec.subsets[1].name: duplicate subset name 'v1' "
                      "(also spec.subsets[0])"]


S = "ServiceEntry default/r: spec"


@pytest.mark.parametrize("spec,expected", [
    ({"hosts": ["*"], "ports": [{"number": 80, "name": "http"}]}, f"{S}.hosts[0]: \"*\" is not allowed here"),
    ({"hosts": ["a.com"], "resolution": "NONE", "endpoints": [{"address": "1.2.3.4"}]},
     f"{S}.endpoints: must be empty when resolution is NONE"),
    ({"hosts": ["a.com"], "resolution": "STATIC", "endpoints": [{"address": "a.com"}],
      "ports": [{"number": 80, "name": "http"}]},
     f"{S}.endpoints[0].address: must be an IP for resolution STATIC, got 'a.com'"),
    ({"hosts": ["*.a.com"], "resolution": "DNS", "ports": [{"number": 80, "name": "http"}]},
     f"{S}.hosts[0]: resolution DNS without endpoints needs a host name, not a wildcard ('*.a.com')"),
    ({"hosts": ["a.com"], "ports": [{"number": 80, "name": "http"}, {"number": 80, "name": "web"}]},
     f"{S}.ports[1].number: duplicate port number 80 (also spec.ports[0])"),
    ({"hosts": ["a.com"], "ports": [{"number": 80}]}, f"{S}.ports[0].name: required"),
    ({"hosts": ["a.com"], "resolution": "STATIC", "ports": [{"number": 80, "name": "http"}],
      "endpoints": [{"address": "1.2.3.4", "ports": {"grpc": 9000}}]},
     f"{S}.endpoints[0].ports.grpc: is not the name of one of spec.ports"),
    ({"hosts": ["a.com"], "resolution": "SOMETIMES"},
     f"{S}.resolution: must be one of DNS|DNS_ROUND_ROBIN|DYNAMIC_DNS|NONE|STATIC, got 'SOMETIMES'"),
], ids=["star host", "none with endpoints", "static needs ip", "dns wildcard", "dup port", "port name",
        "endpoint port name", "resolution enum"])
def test_service_entry_rule_reports_exact_path(spec, expected):
    errors = decode("ServiceEntry", spec).errors
    assert expected in errors, errors


G = "Gateway default/r: spec"


@pytest.mark.parametrize("servers,expected", [
    ([{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["a.com"]}],
     f"{G}.servers[0].tls: required for protocol HTTPS"),
    ([{"port": {"number": 80, "name": "http"}, "hosts": ["a.com"]}], f"{G}.servers[0].port.protocol: required"),
    ([{"port": {"number": 80, "name": "http", "protocol": "HTTP"}}], f"{G}.servers[0].hosts: required"),
    ([{"hosts": ["a.com"]}], f"{G}.servers[0].port: required"),
    ([{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["a.com"], "tls": {"mode": "SIMPLE"}}],
     f"{G}.servers[0].tls.serverCertificate: required for mode SIMPLE without credentialName"),
    ([], f"{G}.servers: required, must not be empty"),
], ids=["https needs tls", "protocol required", "hosts required", "port required", "simple needs cert",
        "servers required"])
def test_gateway_rule_reports_exact_path(servers, expected):
    errors = decode("Gateway", {"servers": servers}).errors
    assert expected in errors, errors


SC = "Sidecar default/r: spec"


@pytest.mark.parametrize("spec,expected", [
    ({"egress": [{"hosts": ["reviews"]}]}, f"{SC}.egress[0].hosts[0]: must be \"namespace/dnsName\", got 'reviews'"),
    ({"egress": [{"hosts": ["./*"]}, {"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["./*"]}]},
     f"{SC}.egress[0]: only the last egress listener may omit port"),
    ({"ingress": [{"port": {"number": 80, "protocol": "HTTP", "name": "h"}, "defaultEndpoint": "10.0.0.1:80"}]},
     f"{SC}.ingress[0].defaultEndpoint: must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or "
     "unix://path, got '10.0.0.1:80'"),
    ({"ingress": [{"defaultEndpoint": "127.0.0.1:8080"}]}, f"{SC}.ingress[0].port: required"),
], ids=["egress host form", "catch-all egress last", "ingress endpoint", "ingress port"])
def test_sidecar_rule_reports_exact_path(spec, expected):
    errors = decode("Sidecar", spec).errors
    assert expected in errors, errors


def test_bad_resource_is_excluded_and_good_ones_kept():
    docs = [Document("f.yaml", i, yaml.safe_load(text)) for i, text in enumerate([
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: good}\n"
        "spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\n"
        "spec: {hosts: [b], http: [{route: [{destination: {host: b}, weight: -5}]}]}",
    ])]
    result = decode_documents(docs)
    assert [r.name for r in result.resources] == ["good"]
    assert result.errors == ["VirtualService default/bad: spec.http[0].route[0].weight: must be >= 0, got -5"]
    assert result.rejected == {("VirtualService", "default", "bad")}


def test_destination_rule_tls_settings_not_applied_are_refused_at_every_level():
    spec = {"host": "api.example.com",
            "trafficPolicy": {"tls": {"mode": "SIMPLE", "caCrl": "/crl.pem"},
                              "portLevelSettings": [{"port": {"number": 443}, "tls": {
                                  "mode": "MUTUAL", "credentialName": "client-secret",
                                  "clientCertificate": "/c.pem"}}]},
            "subsets": [{"name": "v1", "trafficPolicy": {"tls": {"mode": "SIMPLE", "caCrl": "/crl.pem"}}}]}
    result = decode("DestinationRule", spec)
    crl = "certificate revocation lists are not checked by this proxy; refused"
    secret = "give either credentialName or the certificate files, not both (Istio)"
    assert result.resources == []
    assert result.errors == [
        f"DestinationRule default/r: spec.trafficPolicy.tls.caCrl: {crl}",
        f"DestinationRule default/r: spec.trafficPolicy.portLevelSettings[0].tls.clientCertificate: {secret}",
        f"DestinationRule default/r: spec.subsets[0].trafficPolicy.tls.caCrl: {crl}",
    ]


def test_destination_rule_tls_modes_are_accepted_at_every_level():
    for tls in ({"mode": "DISABLE"}, {}, {"mode": "SIMPLE", "sni": "x"}, {"mode": "ISTIO_MUTUAL"}):
        result = decode("DestinationRule", {"host": "a", "trafficPolicy": {"tls": tls}})
        assert result.errors == [] and len(result.resources) == 1, (tls, result.errors)


def test_accepted_fields_that_are_not_applied_are_warned_once_each_with_their_path():
    spec = {"host": "a", "trafficPolicy": {
        "loadBalancer": {"simple": "ROUND_ROBIN", "localityLbSetting": {"enabled": True, "failover": [
            {"from": "us-east", "to": "us-west"}]}},
        "connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}},
        "tunnel": {"protocol": "CONNECT", "targetHost": "x", "targetPort": 80}}}
    result = decode("DestinationRule", spec)
    assert result.errors == []
    assert result.warnings == [
        "DestinationRule default/r: spec.trafficPolicy.tunnel: HTTP CONNECT tunnelling is not supported by this "
        "proxy; ignored",
        "DestinationRule default/r: spec.trafficPolicy.loadBalancer.localityLbSetting: locality-weighted load "
        "balancing is not supported; endpoints are picked regardless of locality",
        "DestinationRule default/r: spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: this proxy speaks "
        "HTTP/1.1 to upstreams; HTTP/2 settings do not apply",
    ]
    assert result.resources[0].warnings == tuple(result.warnings)
    # values that are the proxy's behaviour already, and proto3 zero values, are not warned about
    quiet = decode("DestinationRule", {"host": "a", "trafficPolicy": {"connectionPool": {"http": {
        "h2UpgradePolicy": "DO_NOT_UPGRADE", "useClientProtocol": False}}}})
    assert quiet.errors == [] and quiet.warnings == []


@pytest.mark.parametrize("host", ["*x", "*x.example.com", "*-api.example.com", "*.example.com", "*"])
def test_partial_wildcard_hosts_are_accepted_where_istio_accepts_them(host):
    spec = {"hosts": [host], "gateways": ["gw"], "http": [ROUTE]}
    assert decode("VirtualService", spec).errors == []


@pytest.mark.parametrize("host", ["x*.example.com", "a.*.example.com", "**.example.com", "*_x.example.com", "*."])
def test_wildcards_anywhere_but_the_start_of_the_first_label_are_refused(host):
    errors = decode("VirtualService", {"hosts": [host], "gateways": ["gw"], "http": [ROUTE]}).errors
    assert errors and errors[0].startswith("VirtualService default/r: spec.hosts[0]: "), errors


def test_partial_wildcard_overlaps_are_found_like_istio():
    errors = decode("VirtualService", {"hosts": ["*x.example.com", "ax.example.com"], "gateways": ["gw"],
                                       "http": [ROUTE]}).errors
    assert errors == ["VirtualService default/r: spec.hosts[1]: 'ax.example.com' duplicates or overlaps "
                      "spec.hosts[0] '*x.example.com'"]
