"""Decoding the ``security.istio.io`` kinds: AuthorizationPolicy and PeerAuthentication.

Part of the one decode boundary: :func:`meshproxy.config.decode.decode_document` calls
these with its reader, so errors read exactly like the networking kinds'
(``AuthorizationPolicy default/deny-all: spec.rules[0].from[0].source.ipBlocks[1]: ...``),
all are collected, unknown fields are errors, and a refused policy keeps its last good
version.  Validation follows Istio's webhook (``pkg/config/validation``,
``pkg/config/security``).  What this mesh cannot apply is refused, never accepted and
dropped: ``action: CUSTOM`` (no external authorizer), JWT fields (``requestPrincipals``,
``request.auth.*``: no RequestAuthentication), ``experimental.*`` keys, and
``targetRefs`` other than a Kubernetes Gateway.

The decoded specs are the data plane's own types (:mod:`meshproxy.security.authz`,
:mod:`meshproxy.security.peer_authn`): nothing about them needs resolving later except
which workloads they select, which the compiler decides.
"""
from __future__ import annotations

import ipaddress
import re
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..security.authz import (
    ALLOW, AUDIT, CONNECTION_SNI, DENY, DESTINATION_IP, DESTINATION_PORT, REMOTE_IP, REQUEST_HEADER,
    REQUEST_HOST, REQUEST_METHOD, REQUEST_PATH, SOURCE_IP, SOURCE_NAMESPACE, SOURCE_PRINCIPAL,
    SOURCE_SERVICE_ACCOUNT, SOURCE_TRUST_DOMAIN, AuthorizationPolicy, Condition, Rule, path_match,
    path_template_error, value_match,
)
from ..security.peer_authn import MODES, PeerAuthentication

if TYPE_CHECKING:
    from .decode import _Reader

SECURITY_GROUP = "security.istio.io"
SECURITY_API_VERSIONS = frozenset(f"{SECURITY_GROUP}/{v}" for v in ("v1", "v1beta1"))
SECURITY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
DRY_RUN_ANNOTATION = "istio.io/dry-run"

MAX_RULES = 512
MAX_TARGET_REFS = 16
MAX_SERVICE_ACCOUNTS = 16

_SOURCE_FIELDS = {
    "principals": SOURCE_PRINCIPAL, "namespaces": SOURCE_NAMESPACE, "ipBlocks": SOURCE_IP,
    "remoteIpBlocks": REMOTE_IP, "serviceAccounts": SOURCE_SERVICE_ACCOUNT,
}
_OPERATION_FIELDS = {"hosts": REQUEST_HOST, "ports": DESTINATION_PORT, "methods": REQUEST_METHOD,
                     "paths": REQUEST_PATH}
_WHEN_KEYS = {
    "source.ip": SOURCE_IP, "remote.ip": REMOTE_IP, "source.namespace": SOURCE_NAMESPACE,
    "source.principal": SOURCE_PRINCIPAL, "source.serviceAccount": SOURCE_SERVICE_ACCOUNT,
    "source.trustDomain": SOURCE_TRUST_DOMAIN, "destination.ip": DESTINATION_IP,
    "destination.port": DESTINATION_PORT, "connection.sni": CONNECTION_SNI,
}
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_UNSUPPORTED_JWT = "JWT authentication (RequestAuthentication) is not supported by this mesh; refused"


def _selector(r: "_Reader", m: dict, path: str) -> MappingProxyType | None:
    if m.get("selector") is None:
        return None
    sel = r.obj(m["selector"], f"{path}.selector", "SecurityWorkloadSelector")
    if sel is None:
        return None
    labels = r.str_map(sel, "matchLabels", f"{path}.selector")
    return labels if labels is not None else MappingProxyType({})


# ---------------------------------------------------------------- AuthorizationPolicy


def decode_authorization_policy(r: "_Reader", raw: Any, namespace: str) -> AuthorizationPolicy | None:
    m = r.obj(raw, "spec", "AuthorizationPolicy")
    if m is None:
        return None
    action = r.string(m, "action", "spec", choices=(ALLOW, DENY, AUDIT, "CUSTOM")) or ALLOW
    if action == "CUSTOM":
        r.error("spec.action", "CUSTOM (an external authorizer) is not supported by this mesh; use ALLOW, "
                "DENY or AUDIT")
    # spec.provider: refused by the field registry (fields.py, AuthorizationPolicy)
    selector = _selector(r, m, "spec")
    refs = []
    if m.get("targetRef") is not None:
        refs.append((m["targetRef"], "spec.targetRef"))
    refs.extend((item, p) for _, item, p in r.items(m, "targetRefs", "spec"))
    if m.get("targetRef") is not None and m.get("targetRefs"):
        r.error("spec.targetRef", "cannot be set together with targetRefs")
    if selector is not None and refs:
        r.error("spec.selector", "cannot be set together with targetRef(s)")
    if len(refs) > MAX_TARGET_REFS:
        r.error("spec.targetRefs", f"at most {MAX_TARGET_REFS} entries, got {len(refs)}")
    target_refs = []
    for item, p in refs:
        ref = _target_ref(r, item, p, namespace)
        if ref is not None:
            target_refs.append(ref)
    if m.get("rules") is not None and not isinstance(m.get("rules"), list):
        r.error("spec.rules", "must be a list")
    items = r.items(m, "rules", "spec")
    if action == DENY and not items:
        r.error("spec.rules", "required for action DENY (a DENY policy without rules would match nothing)")
    if len(items) > MAX_RULES:
        r.error("spec.rules", f"at most {MAX_RULES} rules, got {len(items)}")
    rules = []
    for i, item, p in items:
        rule = _rule(r, item, p, i, namespace)
        if rule is not None:
            rules.append(rule)
    return AuthorizationPolicy(action=action, rules=tuple(rules), selector=selector, target_refs=tuple(target_refs))


def _target_ref(r: "_Reader", raw: Any, path: str, namespace: str):
    m = r.obj(raw, path, "PolicyTargetReference", required=("kind", "name"))
    if m is None:
        return None
    group = r.string(m, "group", path) or ""
    kind = r.string(m, "kind", path) or ""
    name = r.string(m, "name", path) or ""
    ns = r.string(m, "namespace", path) or namespace
    if ns != namespace:
        r.error(f"{path}.namespace", f"must be the policy's namespace {namespace!r}, got {ns!r}")
    if kind and not (kind == "Gateway" and group == GATEWAY_API_GROUP):
        r.error(path, f"targetRef {group or 'core'}/{kind} is not supported: only a Kubernetes Gateway "
                f"(group {GATEWAY_API_GROUP}, kind Gateway) can be targeted here (Service and ServiceEntry "
                "targets apply to waypoints, which this mesh does not have); use selector")
        return None
    return (group, kind, ns, name)


def _rule(r: "_Reader", raw: Any, path: str, index: int, namespace: str) -> Rule | None:
    if raw is None:
        r.error(path, "a rule must not be null")
        return None
    m = r.obj(raw, path, "Rule")
    if m is None:
        return None
    sources = []
    if m.get("from") is not None and not m.get("from"):
        r.error(f"{path}.from", "must not be empty when set")
    if len(r.items(m, "from", path)) > MAX_RULES:
        r.error(f"{path}.from", f"at most {MAX_RULES} entries")
    for _, item, p in r.items(m, "from", path):
        fm = r.obj(item, p, "RuleFrom")
        if fm is None:
            continue
        if not fm.get("source"):
            r.error(f"{p}.source", "required, must not be empty")
            continue
        group = _source(r, fm["source"], f"{p}.source", namespace)
        if group is not None:
            sources.append(group)
    operations = []
    if m.get("to") is not None and not m.get("to"):
        r.error(f"{path}.to", "must not be empty when set")
    for _, item, p in r.items(m, "to", path):
        tm = r.obj(item, p, "RuleTo")
        if tm is None:
            continue
        if not tm.get("operation"):
            r.error(f"{p}.operation", "required, must not be empty")
            continue
        group = _operation(r, tm["operation"], f"{p}.operation")
        if group is not None:
            operations.append(group)
    when = []
    for _, item, p in r.items(m, "when", path):
        cond = _when(r, item, p, namespace)
        if cond is not None:
            when.extend(cond)
    return Rule(tuple(sources), tuple(operations), tuple(when), index)


def _strings(r: "_Reader", m: dict, key: str, path: str) -> tuple[str, ...] | None:
    """A list of non-empty strings, or None when the field is absent."""
    if m.get(key) is None:
        return None
    values = r.str_list(m, key, path)
    for i, v in enumerate(values):
        if v == "":
            r.error(f"{path}.{key}[{i}]", "must not be empty")
    return values


def _source(r: "_Reader", raw: Any, path: str, namespace: str) -> tuple[Condition, ...] | None:
    m = r.obj(raw, path, "Source")
    if m is None:
        return None
    # requestPrincipals / notRequestPrincipals: refused by the field registry (fields.py, Source)
    conditions = []
    for field, key in _SOURCE_FIELDS.items():
        for negated, name in ((False, field), (True, "not" + field[0].upper() + field[1:])):
            values = _strings(r, m, name, path)
            if values is None:
                continue
            parsed = _values(r, key, values, f"{path}.{name}", namespace)
            if parsed is not None:
                conditions.append(Condition(key, parsed, negated))
    has_sa = m.get("serviceAccounts") is not None or m.get("notServiceAccounts") is not None
    if has_sa and any(m.get(k) is not None for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")):
        r.error(path, "serviceAccounts cannot be combined with principals or namespaces")
    if not any(v is not None for v in m.values()):
        r.error(path, "must not be empty")
    return tuple(conditions)


def _operation(r: "_Reader", raw: Any, path: str) -> tuple[Condition, ...] | None:
    m = r.obj(raw, path, "Operation")
    if m is None:
        return None
    conditions = []
    for field, key in _OPERATION_FIELDS.items():
        for negated, name in ((False, field), (True, "not" + field[0].upper() + field[1:])):
            values = _strings(r, m, name, path)
            if values is None:
                continue
            parsed = _values(r, key, values, f"{path}.{name}", "")
            if parsed is not None:
                conditions.append(Condition(key, parsed, negated))
    if not any(v is not None for v in m.values()):
        r.error(path, "must not be empty")
    return tuple(conditions)


def _when(r: "_Reader", raw: Any, path: str, namespace: str) -> list[Condition] | None:
    m = r.obj(raw, path, "Condition")
    if m is None:
        return None
    key = r.string(m, "key", path, required=True)
    if not key:
        return None
    values = _strings(r, m, "values", path)
    not_values = _strings(r, m, "notValues", path)
    if not values and not not_values:
        r.error(path, "needs values or notValues")
    header = ""
    hm = _HEADER_KEY.match(key)
    if hm:
        attr, header = REQUEST_HEADER, hm.group(1).strip().lower()
    elif key.startswith("request.auth."):
        r.error(f"{path}.key", f"{key}: {_UNSUPPORTED_JWT}")
        return None
    elif key.startswith("experimental.envoy.filters."):
        r.error(f"{path}.key", f"{key}: Envoy filter metadata is not supported by this proxy; refused")
        return None
    elif key in _WHEN_KEYS:
        attr = _WHEN_KEYS[key]
    else:
        supported = ", ".join(["request.headers[<name>]", *_WHEN_KEYS])
        r.error(f"{path}.key", f"unknown key {key!r} (supported: {supported})")
        return None
    out = []
    for negated, vals, name in ((False, values, "values"), (True, not_values, "notValues")):
        if vals:
            parsed = _values(r, attr, vals, f"{path}.{name}", namespace)
            if parsed is not None:
                out.append(Condition(attr, parsed, negated, header))
    return out


def _values(r: "_Reader", key: str, values: tuple[str, ...], path: str, namespace: str) -> tuple | None:
    """Field values -> the matcher form :class:`~meshproxy.security.authz.Condition` holds."""
    ok = True
    out: list = []
    for i, v in enumerate(values):
        where = f"{path}[{i}]"
        if not v:
            ok = False
            continue
        if key in (SOURCE_IP, REMOTE_IP, DESTINATION_IP):
            try:
                out.append(ipaddress.ip_network(v, strict=False))
            except ValueError:
                r.error(where, f"must be an IP address or CIDR, got {v!r}")
                ok = False
        elif key == DESTINATION_PORT:
            if not v.isdigit() or not 0 <= int(v) <= 65535:
                r.error(where, f"must be a port number 0-65535, got {v!r}")
                ok = False
            else:
                out.append(int(v))
        elif key == SOURCE_SERVICE_ACCOUNT:
            if "*" in v:
                r.error(where, "a service account cannot contain *")
                ok = False
            elif len(v) > 320:
                r.error(where, "a service account is at most 320 characters")
                ok = False
            elif v.count("/") > 1 or v.startswith("/") or v.endswith("/"):
                r.error(where, f"must be \"namespace/name\" or \"name\", got {v!r}")
                ok = False
            else:
                ns, _, sa = v.rpartition("/")
                out.append((ns or namespace, sa))
        elif key == REQUEST_PATH:
            problem = path_template_error(v)
            if problem:
                r.error(where, problem)
                ok = False
            else:
                out.append(path_match(v))
        elif key == SOURCE_PRINCIPAL and v.startswith("spiffe://"):
            r.error(where, f"principals are written without spiffe:// (e.g. \"cluster.local/ns/default/sa/sleep\"), "
                    f"got {v!r}")
            ok = False
        else:
            out.append(value_match(v, lower=(key == REQUEST_HOST)))
    if key == SOURCE_SERVICE_ACCOUNT and len(values) > MAX_SERVICE_ACCOUNTS:
        r.error(path, f"at most {MAX_SERVICE_ACCOUNTS} service accounts, got {len(values)}")
        ok = False
    return tuple(out) if ok else None


# ---------------------------------------------------------------- PeerAuthentication


def decode_peer_authentication(r: "_Reader", raw: Any, namespace: str) -> PeerAuthentication | None:
    m = r.obj(raw, "spec", "PeerAuthentication")
    if m is None:
        return None
    selector = _selector(r, m, "spec")
    mode = "UNSET"
    if m.get("mtls") is not None:
        mm = r.obj(m["mtls"], "spec.mtls", "PeerAuthenticationMTLS")
        if mm is not None:
            mode = r.string(mm, "mode", "spec.mtls", choices=MODES) or "UNSET"
    ports = []
    raw_ports = m.get("portLevelMtls")
    if raw_ports is not None:
        if not selector:
            r.error("spec.portLevelMtls", "needs a non-empty selector (port-level settings apply to workloads)")
        if not isinstance(raw_ports, dict):
            r.error("spec.portLevelMtls", "must be a mapping of port number to {mode}")
        elif not raw_ports:
            r.error("spec.portLevelMtls", "must not be empty when set")
        else:
            for key, value in raw_ports.items():
                where = f"spec.portLevelMtls.{key}"
                port = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else None
                if port is None or not 1 <= port <= 65535:
                    r.error(where, f"key must be a port number 1-65535, got {key!r}")
                    continue
                pm = r.obj(value, where, "PeerAuthenticationMTLS")
                if pm is not None:
                    ports.append((port, r.string(pm, "mode", where, choices=MODES) or "UNSET"))
    return PeerAuthentication(mode=mode, selector=selector, port_level=tuple(sorted(ports)))


SECURITY_DECODERS = {
    "AuthorizationPolicy": decode_authorization_policy,
    "PeerAuthentication": decode_peer_authentication,
}
