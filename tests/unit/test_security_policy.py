"""AuthorizationPolicy and PeerAuthentication: decode (Istio's validation), scope,
and the decision, including the allow/deny matrices of Istio's documentation tasks."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from meshproxy.config.compile import ProxyIdentity, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.resources import Document
from meshproxy.security.authz import AuthzRequest, evaluate, normalize_path
from meshproxy.security.peer_authn import PeerAuthentication, ScopedPeerAuthentication, resolve_mtls


def decode(text: str):
    docs = [Document("test.yaml", i, d) for i, d in enumerate(yaml.safe_load_all(textwrap.dedent(text))) if d]
    return decode_documents(docs)


def policies_for(text: str, namespace: str = "foo", labels: dict | None = None, mode: str = "sidecar"):
    """Compile ``text`` for a workload and return the PolicySet of its inbound listener."""
    result = decode(text + textwrap.dedent(f"""
        ---
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: default, namespace: {namespace}}}
        spec:
          ingress:
          - port: {{number: 9080, protocol: HTTP, name: http}}
            defaultEndpoint: 127.0.0.1:8080
        """))
    assert not result.errors, result.errors
    snap = compile_snapshot(result.resources, ProxyIdentity(namespace=namespace, labels=labels or {}, mode=mode)).snapshot
    inbound = [l for l in snap.listeners if l.name.startswith("inbound")]
    return inbound[0]


def req(**kw) -> AuthzRequest:
    base = dict(source_ip="10.0.0.9", destination_port=9080, principal="", http=True, host="httpbin.foo",
                method="GET", path="/", headers={})
    base.update(kw)
    return AuthzRequest(**base)


SLEEP = "cluster.local/ns/foo/sa/sleep"
OTHER = "cluster.local/ns/bar/sa/sleep"


def policy(spec: str, name: str = "p", namespace: str = "foo", extra_meta: str = "") -> str:
    return textwrap.dedent(f"""
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: {name}, namespace: {namespace}{extra_meta}}}
        spec:
        """) + textwrap.indent(textwrap.dedent(spec), "  ")


# ---------------------------------------------------------------- decode


def test_custom_action_is_refused_with_a_clear_error():
    result = decode(policy("action: CUSTOM\nprovider: {name: ext}\nrules: [{}]\n"))
    assert result.resources == []
    assert any("AuthorizationPolicy foo/p: spec.action: CUSTOM (an external authorizer) is not supported" in e
               for e in result.errors), result.errors
    assert "AuthorizationPolicy foo/p: spec.provider: only valid with action CUSTOM, which is not supported" \
        in result.errors


@pytest.mark.parametrize("spec, error", [
    ("action: DENY\n", "spec.rules: required for action DENY"),
    ("selector: {matchLabels: {app: a}}\ntargetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: g}]\n",
     "spec.selector: cannot be set together with targetRef(s)"),
    ("targetRefs: [{kind: Service, name: httpbin}]\n", "targetRef core/Service is not supported"),
    ("rules: [{from: []}]\n", "spec.rules[0].from: must not be empty when set"),
    ("rules: [{from: [{source: {}}]}]\n", "spec.rules[0].from[0].source: required, must not be empty"),
    ("rules: [{to: [{operation: {methods: ['']}}]}]\n", "spec.rules[0].to[0].operation.methods[0]: must not be empty"),
    ("rules: [{from: [{source: {ipBlocks: ['10.0.0.300']}}]}]\n", "ipBlocks[0]: must be an IP address or CIDR"),
    ("rules: [{to: [{operation: {ports: ['70000']}}]}]\n", "ports[0]: must be a port number 0-65535"),
    ("rules: [{to: [{operation: {paths: ['/a/{**}/b']}}]}]\n", "{**} must be the last segment"),
    ("rules: [{to: [{operation: {paths: ['/a/{x}']}}]}]\n", "a path template segment must be {*} or {**}"),
    ("rules: [{when: [{key: 'request.headers[x]'}]}]\n", "spec.rules[0].when[0]: needs values or notValues"),
    ("rules: [{when: [{key: destination.namespace, values: [a]}]}]\n", "unknown key 'destination.namespace'"),
    ("rules: [{when: [{key: request.auth.principal, values: [a]}]}]\n", "JWT authentication"),
    ("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]\n", "requestPrincipals: JWT authentication"),
    ("rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]\n", "without spiffe://"),
    ("rules: [{from: [{source: {serviceAccounts: ['a/*']}}]}]\n", "a service account cannot contain *"),
    ("rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]\n",
     "serviceAccounts cannot be combined with principals or namespaces"),
    ("rules: [{frm: [{source: {namespaces: [b]}}]}]\n", 'spec.rules[0].frm: unknown field (did you mean "from"?)'),
    ("rules: [null]\n", "spec.rules[0]: a rule must not be null"),
])
def test_invalid_authorization_policies_are_refused_with_their_path(spec, error):
    result = decode(policy(spec))
    assert result.resources == []
    assert any(error in e for e in result.errors), result.errors


@pytest.mark.parametrize("spec, error", [
    ("portLevelMtls: {'8080': {mode: DISABLE}}\n", "spec.portLevelMtls: needs a non-empty selector"),
    ("selector: {matchLabels: {app: a}}\nportLevelMtls: {}\n", "spec.portLevelMtls: must not be empty"),
    ("selector: {matchLabels: {app: a}}\nportLevelMtls: {'0': {mode: DISABLE}}\n", "key must be a port number"),
    ("mtls: {mode: STRIKT}\n", "spec.mtls.mode: must be one of DISABLE|PERMISSIVE|STRICT|UNSET"),
])
def test_invalid_peer_authentications_are_refused_with_their_path(spec, error):
    text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: foo}\nspec:\n" + \
        textwrap.indent(spec, "  ")
    result = decode(text)
    assert result.resources == []
    assert any(error in e for e in result.errors), result.errors


def test_a_refused_policy_keeps_its_last_good_version_through_the_resource_set():
    from meshproxy.config.decode import merge_last_good
    good = decode(policy("action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]\n"))
    bad = decode(policy("action: DENY\n"))
    merged, notes = merge_last_good(__import__("meshproxy.config.decode", fromlist=["ResourceSet"]).ResourceSet(
        good.resources), bad)
    assert [r.name for r in merged.values()] == ["p"] and "last good version keeps serving" in notes[0]


# ---------------------------------------------------------------- the decision


def test_no_policy_allows_and_spec_empty_allow_policy_denies_everything():
    assert policies_for("").authz is None
    deny_all = policies_for(policy("{}\n")).authz
    d = evaluate(deny_all, req(principal=SLEEP))
    assert not d.allowed and d.reason == "no ALLOW policy matched (foo/p)"


def test_rules_with_an_empty_rule_allow_everything():
    allow_all = policies_for(policy("rules: [{}]\n")).authz
    assert evaluate(allow_all, req()).allowed


def test_deny_wins_over_allow_and_audit_never_decides():
    text = policy("action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]\n", "deny-post") + \
        policy("rules: [{}]\n", "allow-all") + \
        policy("action: AUDIT\nrules: [{to: [{operation: {paths: ['/audit*']}}]}]\n", "audit")
    authz = policies_for(text).authz
    d = evaluate(authz, req(method="POST"))
    assert (d.allowed, d.policy, d.rule) == (False, "foo/deny-post", 0)
    d = evaluate(authz, req(path="/audited"))
    assert d.allowed and d.policy == "foo/allow-all" and d.audit == ("foo/audit",)


def test_istio_task_http_traffic_matrix():
    """Istio's "Authorization for HTTP traffic" task: productpage open to GET, details and
    reviews to the productpage service account only."""
    text = policy("selector: {matchLabels: {app: reviews}}\naction: ALLOW\nrules:\n"
                  "- from: [{source: {principals: ['cluster.local/ns/default/sa/bookinfo-productpage']}}]\n"
                  "  to: [{operation: {methods: [GET]}}]\n", "reviews-viewer", "default")
    authz = policies_for(text, namespace="default", labels={"app": "reviews"}).authz
    productpage = "cluster.local/ns/default/sa/bookinfo-productpage"
    matrix = [
        (dict(principal=productpage, method="GET"), True),
        (dict(principal=productpage, method="POST"), False),
        (dict(principal="cluster.local/ns/default/sa/sleep", method="GET"), False),
        (dict(principal="", method="GET"), False),          # plaintext: no principal
    ]
    for kw, allowed in matrix:
        assert evaluate(authz, req(**kw)).allowed is allowed, kw
    # the policy selects app=reviews only: other workloads in the namespace have none
    assert policies_for(text, namespace="default", labels={"app": "ratings"}).authz is None


def test_istio_task_deny_matrix_with_not_values_and_ip_blocks():
    """Istio's "Explicit deny" task: deny GET to httpbin from outside namespace foo,
    and deny requests from 1.2.3.4 / 5.6.7.0/24."""
    text = policy("selector: {matchLabels: {app: httpbin}}\naction: DENY\nrules:\n"
                  "- from: [{source: {notNamespaces: [foo]}}]\n  to: [{operation: {methods: [GET]}}]\n", "deny-get") + \
        policy("selector: {matchLabels: {app: httpbin}}\naction: DENY\nrules:\n"
               "- from: [{source: {ipBlocks: ['1.2.3.4', '5.6.7.0/24']}}]\n", "deny-ip")
    authz = policies_for(text, labels={"app": "httpbin"}).authz
    assert evaluate(authz, req(principal=SLEEP, method="GET")).allowed
    assert not evaluate(authz, req(principal=OTHER, method="GET")).allowed
    assert not evaluate(authz, req(principal="", method="GET")).allowed    # no principal: not in foo
    assert evaluate(authz, req(principal=OTHER, method="POST")).allowed
    assert not evaluate(authz, req(principal=SLEEP, method="POST", source_ip="5.6.7.42")).allowed
    assert evaluate(authz, req(principal=SLEEP, method="POST", source_ip="5.6.8.1")).allowed


def test_strings_paths_hosts_headers_and_ports():
    text = policy("rules:\n"
                  "- to: [{operation: {hosts: ['*.example.com'], paths: ['/api/{*}/items', '/static/*'], "
                  "notPaths: ['/static/private*'], ports: ['9080']}}]\n"
                  "  when: [{key: 'request.headers[x-token]', values: ['*']}, "
                  "{key: source.ip, notValues: ['10.9.0.0/16']}]\n")
    authz = policies_for(text).authz
    ok = dict(host="Shop.Example.com", path="/api/v1/items", headers={"x-token": "t"})
    assert evaluate(authz, req(**ok)).allowed
    assert not evaluate(authz, req(**{**ok, "host": "shop.example.com:80"})).allowed      # hosts are literal
    assert not evaluate(authz, req(**{**ok, "path": "/api/v1/v2/items"})).allowed         # {*} is one segment
    assert evaluate(authz, req(**{**ok, "path": "/static/app.js"})).allowed
    assert not evaluate(authz, req(**{**ok, "path": "/static/private/key"})).allowed
    assert not evaluate(authz, req(**{**ok, "path": "/static/../static/private/key"})).allowed   # normalised
    assert not evaluate(authz, req(**{**ok, "headers": {}})).allowed                       # presence
    assert not evaluate(authz, req(**{**ok, "headers": {"x-token": ""}})).allowed          # "*" = non-empty
    assert not evaluate(authz, req(**{**ok, "destination_port": 9081})).allowed
    assert not evaluate(authz, req(**{**ok, "source_ip": "10.9.1.1"})).allowed


def test_http_only_fields_on_tcp_drop_allow_rules_and_broaden_deny_rules():
    allow = policies_for(policy("rules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: ['5432']}}]}]\n")).authz
    assert evaluate(allow, req(http=False, destination_port=5432)).allowed       # second rule has no HTTP field
    assert not evaluate(allow, req(http=False, destination_port=9080)).allowed         # the methods rule is dropped
    deny = policies_for(policy("action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]\n")).authz
    assert not evaluate(deny, req(http=False)).allowed                          # ignored field: denies all TCP
    assert evaluate(deny, req(http=True, method="GET")).allowed


def test_service_accounts_and_namespaces_read_the_principal():
    authz = policies_for(policy("rules: [{from: [{source: {serviceAccounts: [sleep, bar/curl]}}]}]\n")).authz
    assert evaluate(authz, req(principal=SLEEP)).allowed                          # "sleep" = foo/sleep
    assert evaluate(authz, req(principal="other.td/ns/bar/sa/curl")).allowed
    assert not evaluate(authz, req(principal=OTHER)).allowed
    ns = policies_for(policy("rules: [{from: [{source: {namespaces: ['ba*']}}]}]\n")).authz
    assert evaluate(ns, req(principal=OTHER)).allowed and not evaluate(ns, req(principal=SLEEP)).allowed


def test_scope_root_namespace_selector_and_gateway_target_refs():
    mesh = policy("action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]\n", "mesh-deny", "istio-system")
    other_ns = policy("{}\n", "bar-deny-all", "bar")
    authz = policies_for(mesh + other_ns).authz
    assert [p.name for p in authz.deny] == ["istio-system/mesh-deny"] and authz.allow == ()
    gw = policy("targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}]\n"
                "action: DENY\nrules: [{to: [{operation: {paths: ['/x']}}]}]\n", "gw")
    assert policies_for(gw).authz is None
    gw_listener = policies_for(gw, labels={"gateway.networking.k8s.io/gateway-name": "web"})
    assert [p.name for p in gw_listener.authz.deny] == ["foo/gw"]


def test_dry_run_policies_report_but_do_not_decide():
    text = policy("action: DENY\nrules: [{}]\n", "dry", extra_meta=", annotations: {istio.io/dry-run: 'true'}")
    d = evaluate(policies_for(text).authz, req())
    assert d.allowed and d.dry_run == ("DENY foo/dry rule 0 would deny",)


def test_normalize_path_removes_dot_segments():
    assert normalize_path("/a/./b/../c") == "/a/c"
    assert normalize_path("/../../etc") == "/etc"
    assert normalize_path("/a/b/..") == "/a/"


# ---------------------------------------------------------------- PeerAuthentication


def _pa(name: str, namespace: str, mode: str, selector: dict | None = None, ports=(), created: str = "",
        order: int = 0) -> ScopedPeerAuthentication:
    return ScopedPeerAuthentication(f"{namespace}/{name}", namespace, created, order,
                                    PeerAuthentication(mode, selector, tuple(ports)))


def test_peer_authentication_precedence_workload_over_namespace_over_mesh():
    pas = [_pa("mesh", "istio-system", "STRICT"), _pa("ns", "foo", "PERMISSIVE", order=1),
           _pa("wl", "foo", "UNSET", {"app": "db"}, ((5432, "DISABLE"), (8080, "UNSET")), order=2)]
    assert resolve_mtls(pas, "foo", {"app": "web"}).mode == "PERMISSIVE"
    assert resolve_mtls(pas, "bar", {}).mode == "STRICT"                       # mesh-wide
    db = resolve_mtls(pas, "foo", {"app": "db"})
    # the workload's UNSET inherits the namespace's PERMISSIVE; an UNSET port inherits that too
    assert db.mode == "PERMISSIVE" and db.for_port(5432) == "DISABLE" and db.for_port(8080) == "PERMISSIVE"


def test_peer_authentication_oldest_wins_and_root_selector_policies_are_ignored():
    pas = [_pa("newer", "foo", "DISABLE", created="2024-02-01T00:00:00Z"),
           _pa("older", "foo", "STRICT", created="2024-01-01T00:00:00Z", order=1),
           _pa("root-selector", "istio-system", "DISABLE", {"app": "web"}, order=2)]
    assert resolve_mtls(pas, "foo", {"app": "web"}).mode == "STRICT"
    assert resolve_mtls([], "foo", {}).mode == "PERMISSIVE"                    # nothing set anywhere


def test_peer_authentication_permissive_reaches_the_inbound_listener():
    text = ("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            "metadata: {name: default, namespace: foo}\nspec: {mtls: {mode: PERMISSIVE}}\n")
    assert policies_for(text).mtls == "PERMISSIVE"


def test_meshproxy_explain_says_which_policy_decided_and_why(tmp_path):
    import subprocess
    import sys
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {name: default, namespace: foo}
        spec:
          ingress: [{port: {number: 9080, protocol: HTTP, name: http}, defaultEndpoint: "127.0.0.1:8080"}]
        """) + policy("action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]\n", "deny-admin")
        + policy("rules: [{from: [{source: {principals: ['cluster.local/ns/foo/sa/sleep']}}]}]\n", "allow-sleep"))
    out = subprocess.run([sys.executable, "-m", "meshproxy", "explain", "--config", str(tmp_path), "--namespace", "foo",
                          "--host", "httpbin", "--path", "/admin/x", "--port", "9080",
                          "--principal", "spiffe://cluster.local/ns/foo/sa/sleep"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "  peer authentication: PERMISSIVE" in out.stdout
    assert "  DENY foo/deny-admin: matches (rule 0)" in out.stdout
    assert "  authorization: DENIED: 403 RBAC: access denied (denied by DENY policy foo/deny-admin (rule 0))" \
        in out.stdout, out.stdout
