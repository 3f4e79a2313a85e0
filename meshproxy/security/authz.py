"""AuthorizationPolicy: the compiled form and the decision, as pure functions.

Istio's semantics (``security.istio.io/v1`` AuthorizationPolicy, Envoy's RBAC filter):

* **Decision order**: CUSTOM (not supported: refused at decode), then any matching
  **DENY** policy denies; then, if no **ALLOW** policy applies to the workload, allow;
  if one applies and any ALLOW policy matches, allow; otherwise deny.  **AUDIT**
  policies never change the decision; a matching one is reported (``Decision.audit``).
* **Policy**: ``spec: {}`` (no rules) matches nothing, so as an ALLOW policy it denies
  everything; ``rules: [{}]`` matches everything.  A policy matches when any rule does.
* **Rule**: any ``from`` AND any ``to`` AND all ``when``; an absent part does not
  constrain.  Inside one source / operation the fields AND, the values of one field OR,
  ``notX`` negates (``notPrincipals: [a]`` matches a caller without a principal).
* **Strings**: exact ``abc``, prefix ``abc*``, suffix ``*abc``, presence ``*`` (non-empty).
  Hosts compare case-insensitively and literally (``a.com`` does not match ``a.com:80``).
  Paths are normalised (RFC 3986 dot segments, as the mesh's default ``BASE``
  normalisation), the query is never part of them; ``{*}`` matches one path segment and
  a final ``{**}`` the rest.
* **Principals** are written without ``spiffe://`` (``cluster.local/ns/default/sa/sleep``);
  ``namespaces`` and ``serviceAccounts`` are read from the caller's principal, so like
  ``principals`` they match only mutually authenticated callers.
* **TCP**: HTTP-only fields (hosts, methods, paths, ``request.headers``) cannot be
  evaluated on a TCP connection: an ALLOW rule that uses one is dropped (matches
  nothing, narrower); in DENY and AUDIT the field is ignored (broader).
* **Denied**: HTTP gets 403 with body ``RBAC: access denied``; a TCP connection is closed.

Nothing here reads config or sockets: :func:`evaluate` takes the policies that apply
to the workload (chosen at compile time) and an :class:`AuthzRequest`.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from .tls import peer_certificate, requested_server_name

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"

DENIED_BODY = b"RBAC: access denied"
SPIFFE = "spiffe://"

# attribute keys (the `when` keys, and the keys source/operation fields map to)
SOURCE_PRINCIPAL = "source.principal"
SOURCE_NAMESPACE = "source.namespace"
SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
SOURCE_TRUST_DOMAIN = "source.trustDomain"
SOURCE_IP = "source.ip"
REMOTE_IP = "remote.ip"
DESTINATION_IP = "destination.ip"
DESTINATION_PORT = "destination.port"
CONNECTION_SNI = "connection.sni"
REQUEST_HOST = "request.host"          # operation.hosts (not a `when` key)
REQUEST_METHOD = "request.method"      # operation.methods
REQUEST_PATH = "request.path"          # operation.paths
REQUEST_HEADER = "request.headers"     # request.headers[<name>]
HTTP_ONLY = frozenset({REQUEST_HOST, REQUEST_METHOD, REQUEST_PATH, REQUEST_HEADER})


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """One Istio string value: ``kind`` is exact | prefix | suffix | present | template."""

    kind: str
    value: str = ""
    pattern: re.Pattern | None = None     # path templates only

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        kind = self.kind
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "suffix":
            return text.endswith(self.value)
        if kind == "present":
            return text != ""
        return self.pattern is not None and self.pattern.fullmatch(text) is not None

    def __str__(self) -> str:
        return {"exact": self.value, "prefix": self.value + "*", "suffix": "*" + self.value,
                "present": "*"}.get(self.kind, self.value)


def value_match(text: str, lower: bool = False) -> ValueMatch:
    """``abc`` / ``abc*`` / ``*abc`` / ``*`` -> :class:`ValueMatch` (``lower``: hosts)."""
    if lower:
        text = text.lower()
    if text == "*":
        return ValueMatch("present")
    if text.startswith("*"):
        return ValueMatch("suffix", text[1:])
    if text.endswith("*"):
        return ValueMatch("prefix", text[:-1])
    return ValueMatch("exact", text)


_TEMPLATE_SEGMENT = re.compile(r"\{\*\*?\}")


def path_match(text: str) -> ValueMatch:
    """A path value; ``{*}`` / ``{**}`` templates become an anchored pattern."""
    if "{" not in text:
        return value_match(text)
    parts = []
    for segment in text.split("/"):
        if segment == "{*}":
            parts.append(r"[^/]+")
        elif segment == "{**}":
            parts.append(r".+")
        else:
            parts.append(re.escape(segment))
    return ValueMatch("template", text, re.compile("/".join(parts)))


def path_template_error(text: str) -> str | None:
    """Why ``text`` is not a valid path value (Istio's validation), or None."""
    if "{" not in text and "}" not in text:
        return None
    segments = text.split("/")
    for i, segment in enumerate(segments):
        if "{" in segment or "}" in segment:
            if segment not in ("{*}", "{**}"):
                return f"a path template segment must be {{*}} or {{**}}, got {segment!r}"
            if segment == "{**}" and i != len(segments) - 1:
                return "{**} must be the last segment of a path template"
    if "*" in text.replace("{*}", "").replace("{**}", ""):
        return "a path template cannot also use * as a prefix or suffix"
    return None


def normalize_path(path: str) -> str:
    """RFC 3986 §5.2.4 dot-segment removal (query already cut): what paths match on."""
    if "." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


# ---------------------------------------------------------------- conditions, rules, policies


@dataclass(frozen=True, slots=True)
class Condition:
    """One field of a source / operation, or one ``when`` entry.

    ``key``: an attribute (``source.principal``, ``request.headers`` + ``header``, ...).
    ``values``: ValueMatch for strings, ip_network for addresses, int for ports,
    (namespace, name) for service accounts.  ``negated``: the ``notX`` form.
    """

    key: str
    values: tuple
    negated: bool = False
    header: str = ""              # request.headers[<name>], lower-case

    @property
    def http_only(self) -> bool:
        return self.key in HTTP_ONLY

    def holds(self, request: "AuthzRequest") -> bool:
        hit = _matches(self, request)
        return not hit if self.negated else hit


@dataclass(frozen=True, slots=True)
class Rule:
    """``from`` alternatives (each a tuple of conditions that AND) AND ``to`` alternatives AND
    every ``when``.  An empty tuple of alternatives means the part was not written."""

    sources: tuple[tuple[Condition, ...], ...] = ()
    operations: tuple[tuple[Condition, ...], ...] = ()
    when: tuple[Condition, ...] = ()
    index: int = 0

    def conditions(self):
        for group in self.sources + self.operations:
            yield from group
        yield from self.when

    @property
    def http_only_fields(self) -> tuple[str, ...]:
        return tuple(sorted({c.key if c.key != REQUEST_HEADER else f"request.headers[{c.header}]"
                             for c in self.conditions() if c.http_only}))


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """One decoded AuthorizationPolicy: what it decides and whom it selects."""

    action: str = ALLOW                                  # ALLOW | DENY | AUDIT
    rules: tuple[Rule, ...] = ()
    selector: Mapping[str, str] | None = None            # matchLabels; None = no selector
    target_refs: tuple[tuple[str, str, str, str], ...] = ()   # (group, kind, namespace, name)
    dry_run: bool = False                                # annotation istio.io/dry-run


@dataclass(frozen=True, slots=True)
class AppliedPolicy:
    """A policy that applies to this workload, with its name for messages and metrics."""

    name: str                                            # "namespace/name"
    action: str
    rules: tuple[Rule, ...]
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every AuthorizationPolicy that applies to one workload, split by action."""

    deny: tuple[AppliedPolicy, ...] = ()
    allow: tuple[AppliedPolicy, ...] = ()
    audit: tuple[AppliedPolicy, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.deny or self.allow or self.audit)

    @property
    def needs_principal(self) -> bool:
        return any(c.key in _PRINCIPAL_KEYS for p in self.deny + self.allow + self.audit
                   for r in p.rules for c in r.conditions())


_PRINCIPAL_KEYS = frozenset({SOURCE_PRINCIPAL, SOURCE_NAMESPACE, SOURCE_SERVICE_ACCOUNT, SOURCE_TRUST_DOMAIN})


# ---------------------------------------------------------------- the request


@dataclass(slots=True)
class AuthzRequest:
    """What a decision reads.  ``principal`` is the caller's SPIFFE id without ``spiffe://``
    ("" = not mutually authenticated).  ``http`` False = a TCP connection.  ``headers``:
    lower-case names, repeated fields joined with ``,`` (RequestView's form)."""

    source_ip: str = ""
    destination_port: int = 0
    principal: str = ""
    remote_ip: str = ""               # "" = source_ip
    destination_ip: str = ""
    sni: str = ""
    http: bool = True
    host: str = ""
    method: str = ""
    path: str = ""
    headers: Mapping[str, str] | None = None


def split_principal(principal: str) -> tuple[str, str, str] | None:
    """``td/ns/NS/sa/SA`` -> (trust domain, namespace, service account), or None."""
    parts = principal.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[0], parts[2], parts[4]
    return None


def principal_of_uri(uri: str) -> str:
    return uri[len(SPIFFE):] if uri.startswith(SPIFFE) else ""


def _ip_in(address: str, networks: tuple) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def _strings(values: tuple, text: str | None) -> bool:
    return any(v.matches(text) for v in values)


def _matches(c: Condition, req: AuthzRequest) -> bool:
    key = c.key
    if key == SOURCE_PRINCIPAL:
        return bool(req.principal) and _strings(c.values, req.principal)
    if key in (SOURCE_NAMESPACE, SOURCE_SERVICE_ACCOUNT, SOURCE_TRUST_DOMAIN):
        parts = split_principal(req.principal) if req.principal else None
        if parts is None:
            return False
        td, ns, sa = parts
        if key == SOURCE_NAMESPACE:
            return _strings(c.values, ns)
        if key == SOURCE_TRUST_DOMAIN:
            return _strings(c.values, td)
        return (ns, sa) in c.values
    if key == SOURCE_IP:
        return _ip_in(req.source_ip, c.values)
    if key == REMOTE_IP:
        return _ip_in(req.remote_ip or req.source_ip, c.values)
    if key == DESTINATION_IP:
        return _ip_in(req.destination_ip, c.values)
    if key == DESTINATION_PORT:
        return req.destination_port in c.values
    if key == CONNECTION_SNI:
        return bool(req.sni) and _strings(c.values, req.sni)
    if key == REQUEST_HOST:
        return _strings(c.values, req.host.lower())
    if key == REQUEST_METHOD:
        return _strings(c.values, req.method)
    if key == REQUEST_PATH:
        return _strings(c.values, normalize_path(req.path))
    if key == REQUEST_HEADER:
        value = req.headers.get(c.header) if req.headers is not None else None
        return _strings(c.values, value)
    raise ValueError(f"unknown authorization attribute {key!r}")   # decode refuses unknown keys


# ---------------------------------------------------------------- the decision


def rule_matches(rule: Rule, action: str, req: AuthzRequest) -> bool:
    """Istio's rule semantics, including how HTTP-only fields read on TCP."""
    tcp = not req.http

    def holds(c: Condition) -> bool:
        if tcp and c.http_only:
            return True            # DENY / AUDIT: ignored (the ALLOW case is dropped below)
        return c.holds(req)

    if tcp and action == ALLOW and any(c.http_only for c in rule.conditions()):
        return False
    if rule.sources and not any(all(holds(c) for c in group) for group in rule.sources):
        return False
    if rule.operations and not any(all(holds(c) for c in group) for group in rule.operations):
        return False
    return all(holds(c) for c in rule.when)


def policy_match(policy: AppliedPolicy, req: AuthzRequest) -> int:
    """Index of the first matching rule, or -1."""
    for i, rule in enumerate(policy.rules):
        if rule_matches(rule, policy.action, req):
            return i
    return -1


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str = ""               # "namespace/name" of the deciding policy ("" = default)
    rule: int = -1                 # index of the matching rule
    reason: str = ""               # one line: why
    audit: tuple[str, ...] = ()    # AUDIT policies that matched
    dry_run: tuple[str, ...] = ()  # what dry-run policies would have decided

    @property
    def details(self) -> str:
        """Envoy's %RESPONSE_CODE_DETAILS% for a denial, as Istio's RBAC filter names policies:
        ``rbac_access_denied_matched_policy[ns[NS]-policy[NAME]-rule[N]]`` for a DENY policy's
        rule, ``rbac_access_denied_matched_policy[none]`` when no ALLOW policy matched (Envoy
        sets no response flag for an RBAC denial: the access log's flags stay ``-``)."""
        if self.allowed:
            return ""
        if not self.policy:
            return "rbac_access_denied_matched_policy[none]"
        namespace, _, name = self.policy.partition("/")
        return f"rbac_access_denied_matched_policy[ns[{namespace}]-policy[{name}]-rule[{max(self.rule, 0)}]]"


ALLOWED_NO_POLICY = Decision(True, reason="no AuthorizationPolicy applies")


def evaluate(policies: PolicySet, req: AuthzRequest) -> Decision:
    """CUSTOM (refused at decode) -> DENY -> ALLOW, as Istio; AUDIT only reports."""
    audit = tuple(p.name for p in policies.audit if policy_match(p, req) >= 0)
    dry: list[str] = []
    for p in policies.deny:
        i = policy_match(p, req)
        if i >= 0:
            if p.dry_run:
                dry.append(f"DENY {p.name} rule {i} would deny")
                continue
            return Decision(False, p.name, i, f"denied by DENY policy {p.name} (rule {i})", audit, tuple(dry))
    enforced_allow = [p for p in policies.allow if not p.dry_run]
    for p in policies.allow:
        i = policy_match(p, req)
        if p.dry_run:
            dry.append(f"ALLOW {p.name} {'would allow (rule %d)' % i if i >= 0 else 'does not match'}")
            continue
        if i >= 0:
            return Decision(True, p.name, i, f"allowed by ALLOW policy {p.name} (rule {i})", audit, tuple(dry))
    if not enforced_allow:
        return Decision(True, "", -1, "no DENY policy matched and no ALLOW policy applies", audit, tuple(dry))
    names = ", ".join(p.name for p in enforced_allow)
    return Decision(False, "", -1, f"no ALLOW policy matched ({names})", audit, tuple(dry))


def request_from_view(view, peer: "PeerInfo", port: int) -> AuthzRequest:
    """An HTTP request (a router RequestView) on a connection from ``peer``."""
    return AuthzRequest(source_ip=peer.source_ip, destination_port=port, principal=peer.principal,
                        destination_ip=peer.destination_ip, sni=peer.sni, http=True,
                        host=view.authority, method=view.method, path=view.path, headers=view.headers)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Who is on the other end of a downstream connection (read once per connection)."""

    source_ip: str = ""
    principal: str = ""            # without spiffe://; "" = no verified client certificate
    destination_ip: str = ""
    sni: str = ""
    mutual_tls: bool = False

    @property
    def spiffe_id(self) -> str:
        return SPIFFE + self.principal if self.principal else ""


def peer_from_transport(get_extra_info: Callable) -> PeerInfo:
    """From an asyncio transport's ``get_extra_info``: peer address, verified client
    certificate's SPIFFE URI SAN, SNI."""
    peer = get_extra_info("peername")
    sock = get_extra_info("sockname")
    principal = ""
    sni = ""
    ssl_object = get_extra_info("ssl_object")
    mutual = False
    if ssl_object is not None:
        sni = requested_server_name(ssl_object)
        cert = peer_certificate(ssl_object)
        if cert is not None:
            for kind, value in cert.sans:
                if kind == "URI" and value.startswith(SPIFFE):
                    principal = principal_of_uri(value)
                    break
            mutual = True
    return PeerInfo(source_ip=peer[0] if peer else "", principal=principal,
                    destination_ip=sock[0] if sock else "", sni=sni, mutual_tls=mutual)


def authorize_connection(policies: PolicySet, get_extra_info: Callable) -> Decision:
    """The decision for a TCP connection (an asyncio transport's ``get_extra_info``)."""
    peer = peer_from_transport(get_extra_info)
    sock = get_extra_info("sockname")
    return evaluate(policies, AuthzRequest(
        source_ip=peer.source_ip, destination_port=sock[1] if sock else 0, principal=peer.principal,
        destination_ip=peer.destination_ip, sni=peer.sni, http=False))


def explain_security(snapshot, authority: str, path: str, method: str, headers: Mapping[str, str],
                     port: int | None, source_ip: str, principal: str) -> list[str]:
    """``meshproxy explain``'s security part: per inbound/gateway HTTP listener (on ``port``
    if given), its peer authentication mode and the AuthorizationPolicy decision."""
    lines: list[str] = []
    for listener in snapshot.listeners:
        if listener.protocol not in ("HTTP", "HTTPS") or (port is not None and listener.port != port):
            continue
        if listener.authz is None and not listener.mtls:
            continue
        lines.append(f"security at listener {listener.name} ({listener.address}:{listener.port}):")
        if listener.mtls:
            lines.append(f"  peer authentication: {listener.mtls}")
        policies = listener.authz
        if policies is None:
            lines.append("  authorization: no AuthorizationPolicy applies: allowed")
            continue
        req = AuthzRequest(source_ip=source_ip, destination_port=listener.port, principal=principal, http=True,
                           host=authority.lower(), method=method, path=path.partition("?")[0],
                           headers={k.lower(): v for k, v in headers.items()})
        for p in policies.deny + policies.allow + policies.audit:
            i = policy_match(p, req)
            state = f"matches (rule {i})" if i >= 0 else "does not match"
            lines.append(f"  {p.action} {p.name}{' (dry run)' if p.dry_run else ''}: {state}")
        decision = evaluate(policies, req)
        verdict = "ALLOWED" if decision.allowed else "DENIED: 403 RBAC: access denied"
        lines.append(f"  authorization: {verdict} ({decision.reason})")
    return lines
