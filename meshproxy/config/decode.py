"""The one decode boundary: raw YAML/JSON mappings -> typed, validated Istio resources.

Nothing else in meshproxy reads a raw config mapping.  Every problem is reported as one
line ``Kind namespace/name: <field path>: <problem>``, e.g.::

    VirtualService default/reviews: spec.http[1].route[2].weight: must be >= 0, got -5

All problems of a document are collected (not just the first).  A resource with any error
is left out of :attr:`DecodeResult.resources`; the others are kept, and
:func:`merge_last_good` puts back the previous good version of each refused resource, so
a bad VirtualService never blocks a good one.

Unknown fields are errors.  Validation follows Istio's webhook
(``pkg/config/validation``): weights, durations, percentages, StringMatch oneofs, regexes,
retryOn tokens, fault, load balancer, outlier detection, ServiceEntry, Gateway and Sidecar
rules.  Fields Istio defines but this proxy does not act on are accepted (real Istio YAML
decodes unchanged) and reported by the compiler as warnings where they change behaviour.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import re
import ssl
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from .model import (
    ConnectionPoolPolicy, ConsistentHash, CorsPolicy, DirectResponse, FaultPolicy, HeaderMatch,
    HeaderOps, HeaderPolicy, LoadBalancerPolicy, NO_HEADER_POLICY, OutlierPolicy, Redirect,
    RetryPolicy, Rewrite, RouteMatch, StringMatch,
)
from .fields import NODES, Refused, Warned, is_zero
from .resources import (
    ClientTLS, Delegate, Destination, DestinationRule, Document, EgressListener, Gateway, HTTPMatch,
    HTTPRoute, IngressListener, L4Match, L4Route, Mirror, PolicyParts, PortSpec, Resource,
    RouteDestination, SecretSpec, Server, ServerTLS, ServiceEntry, ServicePort, Sidecar, Subset,
    TrafficPolicySpec, VirtualService, WorkloadEntry,
)
from .decode_security import SECURITY_API_VERSIONS, SECURITY_DECODERS, SECURITY_GROUP, SECURITY_KINDS

GROUP = "networking.istio.io"
API_VERSIONS = frozenset(f"{GROUP}/{v}" for v in ("v1", "v1beta1", "v1alpha3"))
NETWORKING_KINDS = ("VirtualService", "DestinationRule", "ServiceEntry", "Gateway", "Sidecar")
CORE_KINDS = ("Secret",)                  # core v1: TLS credentials for Gateway credentialName
KINDS = NETWORKING_KINDS + SECURITY_KINDS + CORE_KINDS
GROUPS = (GROUP, SECURITY_GROUP)          # API groups whose documents this decoder reads

# Envoy x-envoy-retry-on and x-envoy-retry-grpc-on policies Istio accepts in retryOn.
RETRY_ON_POLICIES = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
    "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
})
GRPC_STATUS = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})
PROTOCOLS = frozenset({"HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "MYSQL", "REDIS",
                       "UDP", "THRIFT", "HBONE"})
LB_SIMPLE = {"UNSPECIFIED": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST", "LEAST_REQUEST": "LEAST_REQUEST",
             "RANDOM": "RANDOM", "PASSTHROUGH": "PASSTHROUGH", "ROUND_ROBIN": "ROUND_ROBIN"}
CLIENT_TLS_MODES = frozenset({"DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"})
CLIENT_VERIFYING_MODES = frozenset({"MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL"})   # Gateway servers
SERVER_TLS_MODES = frozenset({"PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL",
                              "OPTIONAL_MUTUAL"})
RESOLUTIONS = frozenset({"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"})
LOCATIONS = frozenset({"MESH_EXTERNAL", "MESH_INTERNAL"})
CAPTURE_MODES = frozenset({"DEFAULT", "IPTABLES", "NONE"})

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?$")
HEADER_NAME = re.compile(r"^:?[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Go / protobuf duration (``"1.5s"``, ``"500ms"``, ``"1h30m"``) -> seconds; None if malformed."""
    if not isinstance(text, str) or not text:
        return None
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


# ---------------------------------------------------------------- result types


@dataclass(frozen=True, slots=True)
class DecodeResult:
    resources: list[Resource] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rejected: frozenset[tuple[str, str, str]] = frozenset()   # keys of documents refused for errors


class ResourceSet(Mapping[tuple[str, str, str], Resource]):
    """Immutable mapping ``(kind, namespace, name) -> Resource``: the accepted config."""

    __slots__ = ("_items",)

    def __init__(self, resources: Iterable[Resource] = ()):
        self._items = MappingProxyType({r.key: r for r in resources})

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"ResourceSet({sorted(self._items)})"

    def resources(self) -> list[Resource]:
        """In a stable order: source, then document index."""
        return sorted(self._items.values(), key=lambda r: (r.source, r.index, r.key))

    def apply(self, result: DecodeResult) -> tuple["ResourceSet", list[str]]:
        return merge_last_good(self, result)


def merge_last_good(previous: ResourceSet | None, result: DecodeResult,
                    keep_sources: Iterable[str] = ()) -> tuple[ResourceSet, list[str]]:
    """The new accepted set: every valid resource of ``result``; for each resource whose new
    version was refused, its previous good version (if any); resources that are no longer
    in the input are dropped.  ``keep_sources``: sources that could not be read this time
    (e.g. a YAML syntax error) keep all their previous resources.

    Returns the set and one note per resource kept at its last good version.
    """
    items = {r.key: r for r in result.resources}
    notes: list[str] = []
    if previous is not None:
        keep = set(keep_sources)
        for key in sorted(result.rejected):
            old = previous.get(key)
            if old is not None and key not in items:
                items[key] = old
                notes.append(f"{key[0]} {key[1]}/{key[2]}: new version refused, last good version keeps serving")
        for key, old in previous.items():
            if old.source in keep and key not in items:
                items[key] = old
    return ResourceSet(items.values()), notes


# ---------------------------------------------------------------- reader helpers


_MISSING = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


class _Reader:
    """Reads one document; every error is collected with its resource prefix."""

    def __init__(self, ref: str):
        self.ref = ref
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._warned: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{self.ref}: {path}: {problem}")

    def warn(self, path: str, problem: str) -> None:
        """One warning per path; nothing below a path already warned about (a warned field's
        sub-fields are not acted on either)."""
        if any(path == w or path.startswith(w + ".") or path.startswith(w + "[") for w in self._warned):
            return
        self._warned.append(path)
        self.warnings.append(f"{self.ref}: {path}: {problem}")

    # -- structure

    def obj(self, value: Any, path: str, node: str, required: Iterable[str] = ()) -> dict | None:
        """A mapping read through the registry node ``node`` (:mod:`meshproxy.config.fields`):
        unknown keys are errors; a present field whose status is Warned or Refused gets its
        warning or error here, with its path.  None (after an error) if not a mapping."""
        spec = NODES[node]
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key, item in value.items():
            f = spec.fields.get(key) if isinstance(key, str) else None
            if f is None:
                from difflib import get_close_matches   # only for a mistake: not loaded by every proxy
                hint = get_close_matches(str(key), sorted(spec.fields), n=1)
                self.error(f"{path}.{key}", "unknown field" + (f' (did you mean "{hint[0]}"?)' if hint else ""))
                continue
            status = f.status
            if isinstance(status, (Warned, Refused)) and item is not None and not _is_ok(item, status.ok) and (
                    status.ok or not is_zero(item)):     # with ok values a zero value is a choice too
                if isinstance(status, Refused):
                    self.error(f"{path}.{key}", status.message)
                else:
                    self.warn(f"{path}.{key}", status.message)
        for key in required:
            if value.get(key) is None:
                self.error(f"{path}.{key}", "required")
        return value

    def items(self, m: dict, key: str, path: str) -> list[tuple[int, Any, str]]:
        value = m.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(f"{path}.{key}", f"must be a list, got {_type_name(value)}")
            return []
        return [(i, item, f"{path}.{key}[{i}]") for i, item in enumerate(value)]

    # -- scalars (None when absent or wrong; wrong is reported)

    def string(self, m: dict, key: str, path: str, required: bool = False, choices=None) -> str | None:
        value = m.get(key)
        if value is None:
            if required:
                self.error(f"{path}.{key}", "required")
            return None
        if not isinstance(value, str):
            self.error(f"{path}.{key}", f"must be a string, got {_type_name(value)}")
            return None
        if required and not value:
            self.error(f"{path}.{key}", "required, must not be empty")
            return None
        if choices is not None and value not in choices:
            self.error(f"{path}.{key}", f"must be one of {'|'.join(sorted(choices))}, got {value!r}")
            return None
        return value

    def integer(self, m: dict, key: str, path: str, lo: int | None = None, hi: int | None = None,
                required: bool = False) -> int | None:
        value = m.get(key)
        if value is None:
            if required:
                self.error(f"{path}.{key}", "required")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            self.error(f"{path}.{key}", f"must be an integer, got {_type_name(value)} {value!r}")
            return None
        value = int(value)
        if lo is not None and value < lo:
            self.error(f"{path}.{key}", f"must be >= {lo}, got {value}")
            return None
        if hi is not None and value > hi:
            self.error(f"{path}.{key}", f"must be <= {hi}, got {value}")
            return None
        return value

    def port(self, m: dict, key: str, path: str, required: bool = False) -> int | None:
        return self.integer(m, key, path, 1, 65535, required)

    def boolean(self, m: dict, key: str, path: str) -> bool | None:
        value = m.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(f"{path}.{key}", f"must be true or false, got {_type_name(value)} {value!r}")
            return None
        return value

    def str_list(self, m: dict, key: str, path: str, required: bool = False) -> tuple[str, ...]:
        value = m.get(key)
        if value is None:
            if required:
                self.error(f"{path}.{key}", "required")
            return ()
        if not isinstance(value, list):
            self.error(f"{path}.{key}", f"must be a list of strings, got {_type_name(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{path}.{key}[{i}]", f"must be a string, got {_type_name(item)}")
            else:
                out.append(item)
        if required and not value:
            self.error(f"{path}.{key}", "required, must not be empty")
        return tuple(out)

    def str_map(self, m: dict, key: str, path: str) -> Mapping[str, str] | None:
        value = m.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(f"{path}.{key}", f"must be a mapping of strings, got {_type_name(value)}")
            return None
        out = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.error(f"{path}.{key}.{k}", f"must be a string, got {_type_name(v)}")
            else:
                out[str(k)] = v
        return MappingProxyType(out)

    def duration(self, m: dict, key: str, path: str, required: bool = False,
                 minimum: float = 0.001) -> float | None:
        value = m.get(key)
        if value is None:
            if required:
                self.error(f"{path}.{key}", "required")
            return None
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None:
            self.error(f"{path}.{key}", f'must be a duration like "1.5s", "500ms" or "1m", got {value!r}')
            return None
        if seconds < minimum - 1e-12:
            self.error(f"{path}.{key}", f"must be >= {_fmt_seconds(minimum)}, got {value!r}")
            return None
        return seconds

    def percent(self, m: dict, key: str, path: str) -> float | None:
        """Istio Percent ``{value: N}``: 0 or 0.0001..100."""
        raw = m.get(key)
        if raw is None:
            return None
        sub = self.obj(raw, f"{path}.{key}", "Percent")
        if sub is None:
            return None
        value = sub.get("value", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(f"{path}.{key}.value", f"must be a number, got {_type_name(value)}")
            return None
        value = float(value)
        if value != 0.0 and not 0.0001 <= value <= 100.0:
            self.error(f"{path}.{key}.value", f"must be 0 or in [0.0001, 100], got {value:g}")
            return None
        return value


def _is_ok(value: Any, ok: tuple) -> bool:
    return any(type(value) is type(o) and value == o for o in ok)


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:g}ms" if s < 1 else f"{s:g}s"


# ---------------------------------------------------------------- entry point


def decode_documents(docs: Iterable[Document]) -> DecodeResult:
    """Decode and validate every document; see the module docstring for the contract."""
    resources: list[Resource] = []
    errors: list[str] = []
    warnings: list[str] = []
    rejected: set[tuple[str, str, str]] = set()
    seen: dict[tuple[str, str, str], Resource] = {}
    for doc in docs:
        resource, key, doc_errors, doc_warnings = decode_document(doc)
        warnings.extend(doc_warnings)
        if resource is not None and resource.key in seen:
            first = seen[resource.key]
            doc_errors = [f"{resource.ref}: metadata.name: defined twice (first in {first.source}"
                          f" document {first.index}); this copy is ignored"]
            errors.extend(doc_errors)
            continue
        if doc_errors:
            errors.extend(doc_errors)
            if key is not None:
                rejected.add(key)
            continue
        if resource is not None:
            seen[resource.key] = resource
            resources.append(resource)
    return DecodeResult(resources, errors, warnings, frozenset(rejected - set(seen)))


def decode_document(doc: Document) -> tuple[Resource | None, tuple[str, str, str] | None, list[str], list[str]]:
    """One document -> (resource or None, its key if known, errors, warnings)."""
    body = doc.body
    where = f"{doc.source} document {doc.index}"
    if not isinstance(body, dict):
        return None, None, [f"{where}: must be a mapping, got {_type_name(body)}"], []
    kind = body.get("kind")
    md = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    name = md.get("name") if isinstance(md.get("name"), str) else None
    namespace = md.get("namespace") if isinstance(md.get("namespace"), str) and md.get("namespace") else "default"
    ref = f"{kind if isinstance(kind, str) and kind else where} {namespace}/{name or '?'}"
    r = _Reader(ref)
    api_version = body.get("apiVersion")
    versions = SECURITY_API_VERSIONS if kind in SECURITY_KINDS else (
        frozenset({"v1"}) if kind in CORE_KINDS else API_VERSIONS)
    if api_version not in versions:
        r.error("apiVersion", f"must be one of {', '.join(sorted(versions))}, got {api_version!r}")
    if kind not in KINDS:
        r.error("kind", f"unsupported kind {kind!r} (supported: {', '.join(KINDS)})")
    r.obj(body, "document", "SecretDocument" if kind in CORE_KINDS else "Document")
    r.errors = [e.replace(": document.", ": ", 1) for e in r.errors]   # top-level paths read bare
    meta = r.obj(body.get("metadata"), "metadata", "ObjectMeta")
    labels = annotations = None
    created = ""
    if meta is not None:
        r.string(meta, "name", "metadata", required=True)
        if name and not DNS1123_SUBDOMAIN.match(name):
            r.error("metadata.name", f"must be a lower-case DNS-1123 name, got {name!r}")
        r.string(meta, "namespace", "metadata")
        labels = r.str_map(meta, "labels", "metadata")
        annotations = r.str_map(meta, "annotations", "metadata")
        created = _timestamp(r, meta.get("creationTimestamp"))
    key = (kind, namespace, name) if kind in KINDS and name else None
    spec = None
    if kind in CORE_KINDS:
        spec = _decode_secret(r, body, namespace, (annotations or {}).get(WITHHELD_ANNOTATION, ""))
    elif kind in KINDS:
        raw_spec = body.get("spec")
        if raw_spec is None:
            r.error("spec", "required")
        else:
            spec = _SPEC_DECODERS[kind](r, raw_spec, namespace)
    if r.errors or spec is None:
        return None, key, r.errors, r.warnings
    resource = Resource(
        kind=kind, namespace=namespace, name=name, spec=spec, source=doc.source, index=doc.index,
        api_version=api_version, creation_timestamp=created,
        labels=labels or MappingProxyType({}), annotations=annotations or MappingProxyType({}),
        content_hash=_content_hash(body), warnings=tuple(r.warnings))
    return resource, key, [], r.warnings


def _timestamp(r: _Reader, value: Any) -> str:
    """creationTimestamp -> ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (UTC) so that timestamps sort as strings."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            r.error("metadata.creationTimestamp", f"must be an RFC 3339 time, got {value!r}")
            return ""
    if not isinstance(value, datetime.datetime):
        r.error("metadata.creationTimestamp", f"must be an RFC 3339 time, got {value!r}")
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value.isoformat() + "Z"


def _content_hash(body: dict) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- hosts


def _check_host(r: _Reader, host: str, path: str, allow_star: bool = True) -> None:
    """A host as Istio's ValidateWildcardDomain takes it: ``*``, a DNS name or IP, or a DNS
    name whose first label starts with ``*`` (``*.example.com``, ``*x.example.com``,
    ``*-api.example.com``, ``*x``): the ``*`` stands for any prefix."""
    if host == "*":
        if not allow_star:
            r.error(path, '"*" is not allowed here')
        return
    name = host
    if host.startswith("*"):
        first, dot, rest = host[1:].partition(".")
        if first and not DNS_LABEL.match(first.removeprefix("-")):
            r.error(path, f"must be a DNS name, optionally with a wildcard first label (\"*.example.com\", "
                          f"\"*x.example.com\"), got {host!r}")
            return
        name = rest if (dot or first) else ""
        if not name:
            if not first:
                r.error(path, f"must be a DNS name, optionally with a wildcard first label, got {host!r}")
            return
    if "*" in name:
        r.error(path, f"wildcard is only allowed at the start of the first label (\"*.example.com\"), got {host!r}")
        return
    try:
        ipaddress.ip_address(name)
        if name is host:
            return
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(host) > 255 or not all(DNS_LABEL.match(label) for label in labels):
        r.error(path, f"must be a DNS name (optionally with a \"*.\" prefix) or an IP, got {host!r}")


def _host_covers(wild: str, host: str) -> bool:
    """Does host pattern ``wild`` include ``host`` (Istio: a leading ``*`` is any prefix)?"""
    if wild == "*":
        return True
    if wild.startswith("*"):
        suffix = wild[1:]
        return host == wild or host.endswith(suffix) and len(host) > len(suffix) or \
            (host.startswith("*") and host[1:].endswith(suffix))
    return wild == host


# ---------------------------------------------------------------- StringMatch & friends


def _string_match(r: _Reader, raw: Any, path: str, ignore_case: bool = False,
                  allow_empty: bool = False) -> StringMatch | None:
    m = r.obj(raw, path, "StringMatch")
    if m is None:
        return None
    set_keys = [k for k in ("exact", "prefix", "regex") if k in m]
    if not set_keys:
        if not allow_empty:
            r.error(path, "exactly one of exact, prefix, regex is required")
        return None
    if len(set_keys) > 1:
        r.error(path, f"exactly one of exact, prefix, regex is allowed, got {', '.join(set_keys)}")
        return None
    kind = set_keys[0]
    value = r.string(m, kind, path)
    if value is None:
        return None
    if kind == "regex":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            r.error(f"{path}.regex", f"invalid regular expression {value!r}: {exc}")
            return None
        return StringMatch("regex", value, regex=pattern)
    if ignore_case:
        return StringMatch(kind, value.lower(), ignore_case=True)
    return StringMatch(kind, value)


def _header_matches(r: _Reader, m: dict, key: str, path: str) -> tuple[HeaderMatch, ...]:
    raw = m.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        r.error(f"{path}.{key}", f"must be a mapping of header name to StringMatch, got {_type_name(raw)}")
        return ()
    out = []
    for name, value in raw.items():
        hpath = f"{path}.{key}.{name}"
        if not isinstance(name, str) or not HEADER_NAME.match(name):
            r.error(hpath, "invalid header name")
            continue
        if name != name.lower():
            r.error(hpath, f"header name must be lower-case (\"{name.lower()}\")")
            continue
        if value is None:
            r.error(hpath, "header match cannot be null (use {} to match presence)")
            continue
        sm = _string_match(r, value, hpath, allow_empty=True)
        out.append(HeaderMatch(name, sm))
    return tuple(out)


def _header_policy(r: _Reader, raw: Any, path: str) -> HeaderPolicy:
    m = r.obj(raw, path, "Headers")
    if m is None:
        return NO_HEADER_POLICY

    def ops(key: str) -> HeaderOps:
        sub = m.get(key)
        if sub is None:
            return HeaderOps()
        o = r.obj(sub, f"{path}.{key}", "HeaderOperations")
        if o is None:
            return HeaderOps()
        out = {}
        for op in ("set", "add"):
            values = r.str_map(o, op, f"{path}.{key}") or {}
            for name in values:
                if not HEADER_NAME.match(name):
                    r.error(f"{path}.{key}.{op}.{name}", "invalid header name")
            out[op] = tuple(values.items())
        remove = r.str_list(o, "remove", f"{path}.{key}")
        for i, name in enumerate(remove):
            if not HEADER_NAME.match(name):
                r.error(f"{path}.{key}.remove[{i}]", "invalid header name")
        return HeaderOps(set=out["set"], add=out["add"], remove=tuple(n.lower() for n in remove))

    return HeaderPolicy(request=ops("request"), response=ops("response"))


# ---------------------------------------------------------------- VirtualService


def _decode_virtual_service(r: _Reader, raw: Any, namespace: str) -> VirtualService | None:
    m = r.obj(raw, "spec", "VirtualService")
    if m is None:
        return None
    hosts = r.str_list(m, "hosts", "spec")
    gateways = r.str_list(m, "gateways", "spec")
    for i, gw in enumerate(gateways):
        _check_gateway_ref(r, gw, f"spec.gateways[{i}]")
    bound_to_mesh = not gateways or "mesh" in gateways
    for i, host in enumerate(hosts):
        _check_host(r, host, f"spec.hosts[{i}]", allow_star=not bound_to_mesh)
        for j in range(i):
            other = hosts[j]
            if host == other or _host_covers(other, host) or _host_covers(host, other):
                r.error(f"spec.hosts[{i}]", f"{host!r} duplicates or overlaps spec.hosts[{j}] {other!r}")
                break
    if not any(m.get(k) for k in ("http", "tcp", "tls")):
        r.error("spec", "one of http, tcp or tls must be provided")
    http = tuple(filter(None, (_decode_http_route(r, item, path, i)
                               for i, item, path in r.items(m, "http", "spec"))))
    tcp = tuple(filter(None, (_decode_l4_route(r, item, path, i, tls=False)
                              for i, item, path in r.items(m, "tcp", "spec"))))
    tls = tuple(filter(None, (_decode_l4_route(r, item, path, i, tls=True)
                              for i, item, path in r.items(m, "tls", "spec"))))
    if not hosts:
        # a delegate VirtualService: no hosts, gateways, tcp or tls (Istio ValidateVirtualService)
        if "hosts" in m and m["hosts"] is not None and not isinstance(m["hosts"], list):
            pass
        elif gateways or tcp or tls:
            r.error("spec.hosts", "required (only a delegate VirtualService, with http routes only, has no hosts)")
        for route in http:
            if route.delegate is not None:
                r.error(f"spec.http[{route.index}].delegate", "a delegate VirtualService cannot delegate again")
    for i, t in enumerate(tls):
        for j, match in enumerate(t.match):
            for k, sni in enumerate(match.sni_hosts):
                if hosts and not any(_host_covers(h, sni) or _host_covers(sni, h) for h in hosts):
                    r.error(f"spec.tls[{i}].match[{j}].sniHosts[{k}]", f"{sni!r} is not one of the VirtualService hosts")
    return VirtualService(hosts=hosts, gateways=gateways, http=http, tcp=tcp, tls=tls,
                          export_to=r.str_list(m, "exportTo", "spec"))


def _check_gateway_ref(r: _Reader, ref: str, path: str) -> None:
    if ref == "mesh":
        return
    parts = ref.split("/")
    if len(parts) > 2 or not all(DNS1123_SUBDOMAIN.match(p) for p in parts):
        r.error(path, f'must be "mesh", "name" or "namespace/name", got {ref!r}')


def _decode_destination(r: _Reader, raw: Any, path: str) -> Destination | None:
    m = r.obj(raw, path, "Destination")
    if m is None:
        return None
    host = r.string(m, "host", path, required=True)
    if host:
        _check_host(r, host, f"{path}.host", allow_star=False)
    subset = r.string(m, "subset", path)
    port = None
    if m.get("port") is not None:
        pm = r.obj(m["port"], f"{path}.port", "PortSelector")
        if pm is not None:
            port = r.port(pm, "number", f"{path}.port", required=True)
    if host is None:
        return None
    return Destination(host=host, subset=subset or None, port=port)


def _decode_route_destinations(r: _Reader, m: dict, path: str, http: bool) -> tuple[RouteDestination, ...]:
    fields = "HTTPRouteDestination" if http else "RouteDestination"
    out = []
    total = 0
    for i, item, dpath in r.items(m, "route", path):
        dm = r.obj(item, dpath, fields, required=("destination",))
        if dm is None:
            continue
        weight = r.integer(dm, "weight", dpath, lo=0, hi=2**31 - 1)
        total += weight or 0
        dest = _decode_destination(r, dm["destination"], f"{dpath}.destination") if dm.get("destination") else None
        headers = _header_policy(r, dm["headers"], f"{dpath}.headers") if dm.get("headers") is not None else NO_HEADER_POLICY
        if dest is not None:
            out.append(RouteDestination(dest, weight, headers))
    routes = m.get("route")
    if isinstance(routes, list) and len(routes) > 1 and total <= 0:
        r.error(f"{path}.route", "total weight must be > 0 when there is more than one destination")
    return tuple(out)


def _decode_http_match(r: _Reader, raw: Any, path: str) -> HTTPMatch | None:
    m = r.obj(raw, path, "HTTPMatchRequest")
    if m is None:
        return None
    ignore_case = bool(r.boolean(m, "ignoreUriCase", path))
    uri = _string_match(r, m["uri"], f"{path}.uri", ignore_case=ignore_case) if m.get("uri") is not None else None
    if uri is not None and uri.kind == "regex" and ignore_case:
        r.warn(f"{path}.ignoreUriCase", "only applies to exact and prefix matches; ignored for regex")

    def sm(key: str) -> StringMatch | None:
        return _string_match(r, m[key], f"{path}.{key}") if m.get(key) is not None else None

    query = []
    raw_q = m.get("queryParams")
    if raw_q is not None:
        if not isinstance(raw_q, dict):
            r.error(f"{path}.queryParams", f"must be a mapping of parameter name to StringMatch, got {_type_name(raw_q)}")
        else:
            for qname, qvalue in raw_q.items():
                qm = _string_match(r, qvalue, f"{path}.queryParams.{qname}")
                if qm is not None:
                    query.append((str(qname), qm))
    gateways = r.str_list(m, "gateways", path)
    for i, gw in enumerate(gateways):
        _check_gateway_ref(r, gw, f"{path}.gateways[{i}]")
    source_labels = r.str_map(m, "sourceLabels", path) or {}
    r.string(m, "statPrefix", path)
    route_match = RouteMatch(
        name=r.string(m, "name", path) or "", uri=uri, scheme=sm("scheme"), method=sm("method"),
        authority=sm("authority"), headers=_header_matches(r, m, "headers", path),
        without_headers=_header_matches(r, m, "withoutHeaders", path), query_params=tuple(query),
        port=r.port(m, "port", path), source_labels=tuple(sorted(source_labels.items())), gateways=gateways)
    return HTTPMatch(route_match, r.string(m, "sourceNamespace", path))


def _decode_http_route(r: _Reader, raw: Any, path: str, index: int) -> HTTPRoute | None:
    m = r.obj(raw, path, "HTTPRoute")
    if m is None:
        return None
    n_errors = len(r.errors)
    matches = tuple(filter(None, (_decode_http_match(r, item, mp) for _, item, mp in r.items(m, "match", path))))
    route = _decode_route_destinations(r, m, path, http=True)
    redirect = _decode_redirect(r, m["redirect"], f"{path}.redirect", matches) if m.get("redirect") is not None else None
    direct = _decode_direct_response(r, m["directResponse"], f"{path}.directResponse") \
        if m.get("directResponse") is not None else None
    delegate = None
    if m.get("delegate") is not None:
        dm = r.obj(m["delegate"], f"{path}.delegate", "Delegate")
        if dm is not None:
            dname = r.string(dm, "name", f"{path}.delegate", required=True)
            delegate = Delegate(dname or "", r.string(dm, "namespace", f"{path}.delegate"))
    rewrite = _decode_rewrite(r, m["rewrite"], f"{path}.rewrite") if m.get("rewrite") is not None else None
    fault, grpc_abort = (_decode_fault(r, m["fault"], f"{path}.fault") if m.get("fault") is not None else (None, None))
    retries = _decode_retries(r, m["retries"], f"{path}.retries") if m.get("retries") is not None else None
    timeout = r.duration(m, "timeout", path)
    headers = _header_policy(r, m["headers"], f"{path}.headers") if m.get("headers") is not None else NO_HEADER_POLICY
    cors = _decode_cors(r, m["corsPolicy"], f"{path}.corsPolicy") if m.get("corsPolicy") is not None else None
    mirrors = _decode_mirrors(r, m, path)
    r.string(m, "name", path)

    has_route = bool(m.get("route"))
    has_redirect = m.get("redirect") is not None
    has_direct = m.get("directResponse") is not None
    has_delegate = m.get("delegate") is not None
    if not (has_route or has_redirect or has_direct or has_delegate):
        r.error(path, "one of route, redirect, directResponse or delegate is required")
    for a, b, present in (("route", "redirect", has_route and has_redirect),
                          ("route", "directResponse", has_route and has_direct),
                          ("redirect", "directResponse", has_redirect and has_direct),
                          ("route", "delegate", has_route and has_delegate),
                          ("redirect", "delegate", has_redirect and has_delegate),
                          ("fault", "redirect", has_redirect and m.get("fault") is not None),
                          ("rewrite", "redirect", has_redirect and m.get("rewrite") is not None),
                          ("fault", "directResponse", has_direct and m.get("fault") is not None),
                          ("rewrite", "directResponse", has_direct and m.get("rewrite") is not None)):
        if present:
            r.error(path, f"{a} and {b} cannot be used together")
    if rewrite is not None and rewrite.authority is not None:
        for op in (headers.request.set, headers.request.add):
            if any(name.lower() in ("host", ":authority") for name, _ in op):
                r.error(f"{path}.headers.request", "authority header cannot be set multiple times")
    if len(r.errors) > n_errors:
        return None
    return HTTPRoute(index=index, name=m.get("name") or "", match=matches, route=route, redirect=redirect,
                     direct_response=direct, delegate=delegate, rewrite=rewrite, timeout=timeout,
                     retries=retries, fault=fault, grpc_abort=grpc_abort, mirrors=mirrors, headers=headers,
                     cors=cors)


def _decode_redirect(r: _Reader, raw: Any, path: str, matches: tuple[HTTPMatch, ...]) -> Redirect | None:
    m = r.obj(raw, path, "HTTPRedirect")
    if m is None:
        return None
    uri = r.string(m, "uri", path)
    prefix_rewrite = r.string(m, "prefixRewrite", path)
    derive = r.string(m, "derivePort", path, choices=("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))
    port = r.port(m, "port", path)
    code = r.integer(m, "redirectCode", path, lo=300, hi=399)
    if uri is not None and prefix_rewrite is not None:
        r.error(path, "uri and prefixRewrite cannot be used together")
    if port is not None and derive is not None:
        r.error(path, "port and derivePort cannot be used together")
    if prefix_rewrite is not None and not any(hm.match.uri is not None and hm.match.uri.kind == "prefix"
                                              for hm in matches):
        r.error(f"{path}.prefixRewrite", "requires a uri prefix match")
    if not any(m.get(k) is not None for k in ("uri", "authority", "port", "derivePort", "scheme", "prefixRewrite")):
        r.error(path, "must set at least one of uri, authority, scheme, port, derivePort, prefixRewrite")
    return Redirect(uri=uri, authority=r.string(m, "authority", path), scheme=r.string(m, "scheme", path),
                    port=port, derive_port=derive, prefix_rewrite=prefix_rewrite, code=code or 301)


def _decode_direct_response(r: _Reader, raw: Any, path: str) -> DirectResponse | None:
    m = r.obj(raw, path, "HTTPDirectResponse", required=("status",))
    if m is None:
        return None
    status = r.integer(m, "status", path, lo=200, hi=599)
    body = b""
    if m.get("body") is not None:
        bm = r.obj(m["body"], f"{path}.body", "HTTPBody")
        if bm is not None:
            if "string" in bm and "bytes" in bm:
                r.error(f"{path}.body", "only one of string, bytes is allowed")
            elif bm.get("string") is not None:
                body = (r.string(bm, "string", f"{path}.body") or "").encode()
            elif bm.get("bytes") is not None:
                text = r.string(bm, "bytes", f"{path}.body") or ""
                try:
                    body = base64.b64decode(text, validate=True)
                except ValueError:
                    r.error(f"{path}.body.bytes", "must be base64")
    return DirectResponse(status or 200, body)


def _decode_rewrite(r: _Reader, raw: Any, path: str) -> Rewrite | None:
    m = r.obj(raw, path, "HTTPRewrite")
    if m is None:
        return None
    uri = r.string(m, "uri", path)
    pattern = replacement = None
    if m.get("uriRegexRewrite") is not None:
        rp = f"{path}.uriRegexRewrite"
        rm = r.obj(m["uriRegexRewrite"], rp, "RegexRewrite", required=("match", "rewrite"))
        if rm is not None:
            text = r.string(rm, "match", rp)
            replacement = r.string(rm, "rewrite", rp)
            if text is not None:
                try:
                    pattern = re.compile(text)
                except re.error as exc:
                    r.error(f"{rp}.match", f"invalid regular expression {text!r}: {exc}")
        if uri is not None:
            r.error(path, "uri and uriRegexRewrite cannot be used together")
    if not any(m.get(k) is not None for k in ("uri", "authority", "uriRegexRewrite")):
        r.error(path, "must set at least one of uri, authority, uriRegexRewrite")
    return Rewrite(uri=uri, authority=r.string(m, "authority", path), uri_regex=pattern,
                   uri_regex_rewrite=replacement)


def _decode_retries(r: _Reader, raw: Any, path: str) -> RetryPolicy | None:
    m = r.obj(raw, path, "HTTPRetry")
    if m is None:
        return None
    attempts = r.integer(m, "attempts", path, lo=0, hi=2**31 - 1)
    per_try = r.duration(m, "perTryTimeout", path)
    backoff = r.duration(m, "backoff", path)
    r.boolean(m, "retryRemoteLocalities", path)
    ignore_previous = r.boolean(m, "retryIgnorePreviousHosts", path)
    retry_on = r.string(m, "retryOn", path)
    conditions: set[str] = set()
    codes: set[int] = set()
    if retry_on is not None:
        for token in (t.strip() for t in retry_on.split(",")):
            if not token:
                continue
            if token.isdigit():
                code = int(token)
                if not 100 <= code <= 599:
                    r.error(f"{path}.retryOn", f"{token!r} is not an HTTP status code")
                codes.add(code)
            elif token in RETRY_ON_POLICIES:
                conditions.add(token)
            else:
                r.error(f"{path}.retryOn", f"{token!r} is not a known retry condition or status code")
    if not attempts and any(m.get(k) is not None for k in ("perTryTimeout", "retryOn", "retryRemoteLocalities",
                                                          "retryIgnorePreviousHosts", "backoff")):
        if m.get("attempts") is not None:
            r.error(path, "attempts is 0 (retries disabled) but other retry fields are set")
    if codes:
        conditions.add("retriable-status-codes")
    if retry_on is None:
        conditions = set(DEFAULT_RETRY_ON)
    return RetryPolicy(attempts=attempts if attempts is not None else DEFAULT_RETRY_ATTEMPTS,
                       per_try_timeout=per_try, retry_on=frozenset(conditions),
                       retriable_status_codes=frozenset(codes), backoff_base=backoff or 0.025,
                       ignore_previous_hosts=ignore_previous is not False)


# Istio's policy when a route sets no retries (pilot/pkg/networking/core/route/retry/retry.go).
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                              "retriable-status-codes"})
DEFAULT_RETRY_POLICY = RetryPolicy(attempts=DEFAULT_RETRY_ATTEMPTS, per_try_timeout=None,
                                   retry_on=DEFAULT_RETRY_ON)


def _decode_fault(r: _Reader, raw: Any, path: str) -> tuple[FaultPolicy | None, str | None]:
    m = r.obj(raw, path, "HTTPFaultInjection")
    if m is None:
        return None, None
    if m.get("delay") is None and m.get("abort") is None:
        r.error(path, "must have delay or abort")
        return None, None
    delay = None
    delay_pct = abort_pct = 0.0
    abort_status = None
    grpc = None
    if m.get("delay") is not None:
        dp = f"{path}.delay"
        dm = r.obj(m["delay"], dp, "Delay")
        if dm is not None:
            if dm.get("exponentialDelay") is not None:
                r.error(f"{dp}.exponentialDelay", "not supported")
            elif dm.get("fixedDelay") is None:
                r.error(f"{dp}.fixedDelay", "required")
            delay = r.duration(dm, "fixedDelay", dp)
            delay_pct = _fault_percentage(r, dm, dp)
    if m.get("abort") is not None:
        ap = f"{path}.abort"
        am = r.obj(m["abort"], ap, "Abort")
        if am is not None:
            if am.get("http2Error") is not None:
                r.error(f"{ap}.http2Error", "not supported")
            present = [k for k in ("httpStatus", "grpcStatus") if am.get(k) is not None]
            if len(present) > 1:
                r.error(ap, "only one of httpStatus, grpcStatus is allowed")
            elif not present and am.get("http2Error") is None:
                r.error(ap, "one of httpStatus, grpcStatus is required")
            abort_status = r.integer(am, "httpStatus", ap, lo=200, hi=599)
            grpc = r.string(am, "grpcStatus", ap, choices=GRPC_STATUS)
            abort_pct = r.percent(am, "percentage", ap) or 0.0
    return FaultPolicy(delay=delay, delay_percentage=delay_pct, abort_status=abort_status,
                       abort_percentage=abort_pct), grpc


def _fault_percentage(r: _Reader, m: dict, path: str) -> float:
    if m.get("percentage") is not None:
        return r.percent(m, "percentage", path) or 0.0
    if m.get("percent") is not None:     # deprecated int percent
        r.warn(f"{path}.percent", "deprecated, use percentage")
        return float(r.integer(m, "percent", path, lo=0, hi=100) or 0)
    return 0.0


def _decode_mirrors(r: _Reader, m: dict, path: str) -> tuple[Mirror, ...]:
    out = []
    if m.get("mirror") is not None and m.get("mirrors") is not None:
        r.error(path, "mirror and mirrors cannot be used together")
        return ()
    if m.get("mirror") is not None:
        dest = _decode_destination(r, m["mirror"], f"{path}.mirror")
        pct = 100.0
        if m.get("mirrorPercentage") is not None:
            pct = r.percent(m, "mirrorPercentage", path)
            pct = 100.0 if pct is None else pct
        elif m.get("mirrorPercent") is not None:
            r.warn(f"{path}.mirrorPercent", "deprecated, use mirrorPercentage")
            value = r.integer(m, "mirrorPercent", path, lo=0, hi=100)
            pct = 100.0 if value is None else float(value)
        if dest is not None:
            out.append(Mirror(dest, pct))
    elif m.get("mirrorPercentage") is not None or m.get("mirrorPercent") is not None:
        r.error(path, "mirrorPercentage needs mirror")
    for i, item, mp in r.items(m, "mirrors", path):
        mm = r.obj(item, mp, "HTTPMirrorPolicy", required=("destination",))
        if mm is None or mm.get("destination") is None:
            continue
        dest = _decode_destination(r, mm["destination"], f"{mp}.destination")
        pct = r.percent(mm, "percentage", mp)
        if dest is not None:
            out.append(Mirror(dest, 100.0 if pct is None else pct))
    return tuple(out)


def _decode_cors(r: _Reader, raw: Any, path: str) -> CorsPolicy | None:
    m = r.obj(raw, path, "CorsPolicy")
    if m is None:
        return None
    origins = [sm for _, item, op in r.items(m, "allowOrigins", path)
               if (sm := _string_match(r, item, op)) is not None]
    for origin in r.str_list(m, "allowOrigin", path):
        origins.append(StringMatch("exact", origin))
    unmatched = r.string(m, "unmatchedPreflights", path, choices=("UNSPECIFIED", "FORWARD", "IGNORE"))
    return CorsPolicy(allow_origins=tuple(origins), allow_methods=r.str_list(m, "allowMethods", path),
                      allow_headers=r.str_list(m, "allowHeaders", path),
                      expose_headers=r.str_list(m, "exposeHeaders", path),
                      max_age=r.duration(m, "maxAge", path, minimum=0.0),
                      allow_credentials=r.boolean(m, "allowCredentials", path),
                      forward_unmatched_preflights=unmatched != "IGNORE")


def _decode_l4_route(r: _Reader, raw: Any, path: str, index: int, tls: bool) -> L4Route | None:
    m = r.obj(raw, path, "TLSRoute" if tls else "TCPRoute")
    if m is None:
        return None
    matches = []
    for _, item, mp in r.items(m, "match", path):
        mm = r.obj(item, mp, "TLSMatchAttributes" if tls else "L4MatchAttributes")
        if mm is None:
            continue
        sni = r.str_list(mm, "sniHosts", mp, required=tls)
        for k, host in enumerate(sni):
            _check_host(r, host, f"{mp}.sniHosts[{k}]")
        gateways = r.str_list(mm, "gateways", mp)
        for k, gw in enumerate(gateways):
            _check_gateway_ref(r, gw, f"{mp}.gateways[{k}]")
        subnets = r.str_list(mm, "destinationSubnets", mp)
        for k, subnet in enumerate(subnets):
            try:
                ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                r.error(f"{mp}.destinationSubnets[{k}]", f"must be an IP or CIDR, got {subnet!r}")
        source_subnet = r.string(mm, "sourceSubnet", mp)
        if source_subnet is not None:
            try:
                ipaddress.ip_network(source_subnet, strict=False)
            except ValueError:
                r.error(f"{mp}.sourceSubnet", f"must be an IP or CIDR, got {source_subnet!r}")
                source_subnet = None
        matches.append(L4Match(port=r.port(mm, "port", mp), gateways=gateways,
                               source_labels=r.str_map(mm, "sourceLabels", mp) or MappingProxyType({}),
                               source_namespace=r.string(mm, "sourceNamespace", mp),
                               destination_subnets=subnets, source_subnet=source_subnet,
                               sni_hosts=sni))
    if tls and not matches:
        r.error(f"{path}.match", "a TLS route needs at least one match")
    route = _decode_route_destinations(r, m, path, http=False)
    if not m.get("route"):
        r.error(f"{path}.route", "required, must not be empty")
    return L4Route(index=index, match=tuple(matches), route=route)


# ---------------------------------------------------------------- DestinationRule


def _decode_destination_rule(r: _Reader, raw: Any, namespace: str) -> DestinationRule | None:
    m = r.obj(raw, "spec", "DestinationRule")
    if m is None:
        return None
    host = r.string(m, "host", "spec", required=True)
    if host:
        _check_host(r, host, "spec.host")
    policy = _decode_traffic_policy(r, m["trafficPolicy"], "spec.trafficPolicy", port_level=True) \
        if m.get("trafficPolicy") is not None else None
    subsets = []
    names: dict[str, int] = {}
    for i, item, sp in r.items(m, "subsets", "spec"):
        sm = r.obj(item, sp, "Subset")
        if sm is None:
            continue
        name = r.string(sm, "name", sp, required=True)
        if name in names:
            r.error(f"{sp}.name", f"duplicate subset name {name!r} (also spec.subsets[{names[name]}])")
        elif name:
            names[name] = i
        labels = r.str_map(sm, "labels", sp) or MappingProxyType({})
        sub_policy = _decode_traffic_policy(r, sm["trafficPolicy"], f"{sp}.trafficPolicy", port_level=True) \
            if sm.get("trafficPolicy") is not None else None
        if name:
            subsets.append(Subset(name, labels, sub_policy))
    selector = None
    if m.get("workloadSelector") is not None:
        wm = r.obj(m["workloadSelector"], "spec.workloadSelector", "DRWorkloadSelector")
        if wm is not None:
            selector = r.str_map(wm, "matchLabels", "spec.workloadSelector") or MappingProxyType({})
    export_to = r.str_list(m, "exportTo", "spec")
    if selector is not None and any(e not in (".", namespace) for e in export_to):
        r.error("spec.exportTo", "a DestinationRule with a workloadSelector cannot be exported to other namespaces")
    if host is None:
        return None
    return DestinationRule(host=host, traffic_policy=policy, subsets=tuple(subsets), export_to=export_to,
                           workload_selector=selector)


_POLICY_PARTS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")


def _decode_traffic_policy(r: _Reader, raw: Any, path: str, port_level: bool) -> TrafficPolicySpec | None:
    m = r.obj(raw, path, "TrafficPolicy")
    if m is None:
        return None
    if not any(v is not None for v in m.values()):
        r.error(path, "must set at least one field")
    for extra in ("tunnel", "proxyProtocol", "retryBudget"):
        if m.get(extra) is not None and not isinstance(m[extra], dict):
            r.error(f"{path}.{extra}", f"must be a mapping, got {_type_name(m[extra])}")
    if m.get("tunnel") is not None and m.get("proxyProtocol") is not None:
        r.error(path, "tunnel and proxyProtocol cannot be used together")
    parts = _decode_policy_parts(r, m, path)
    levels = []
    seen_ports: set[int] = set()
    for i, item, pp in r.items(m, "portLevelSettings", path):
        pm = r.obj(item, pp, "PortTrafficPolicy", required=("port",))
        if pm is None or pm.get("port") is None:
            continue
        port_m = r.obj(pm["port"], f"{pp}.port", "PortSelector")
        number = r.port(port_m, "number", f"{pp}.port", required=True) if port_m is not None else None
        if not any(pm.get(k) is not None for k in _POLICY_PARTS):
            r.error(pp, "must set at least one of " + ", ".join(_POLICY_PARTS))
        if number in seen_ports:
            r.error(f"{pp}.port.number", f"port {number} appears twice in portLevelSettings")
        if number is not None:
            seen_ports.add(number)
            levels.append((number, _decode_policy_parts(r, pm, pp)))
    return TrafficPolicySpec(parts=parts, port_level=tuple(levels))


def _decode_policy_parts(r: _Reader, m: dict, path: str) -> PolicyParts:
    return PolicyParts(
        load_balancer=_decode_load_balancer(r, m["loadBalancer"], f"{path}.loadBalancer")
        if m.get("loadBalancer") is not None else None,
        connection_pool=_decode_connection_pool(r, m["connectionPool"], f"{path}.connectionPool")
        if m.get("connectionPool") is not None else None,
        outlier=_decode_outlier(r, m["outlierDetection"], f"{path}.outlierDetection")
        if m.get("outlierDetection") is not None else None,
        tls=_decode_client_tls(r, m["tls"], f"{path}.tls") if m.get("tls") is not None else None)


def _decode_load_balancer(r: _Reader, raw: Any, path: str) -> LoadBalancerPolicy | None:
    m = r.obj(raw, path, "LoadBalancerSettings")
    if m is None:
        return None
    if m.get("simple") is not None and m.get("consistentHash") is not None:
        r.error(path, "only one of simple, consistentHash is allowed")
    simple = r.string(m, "simple", path, choices=LB_SIMPLE)
    if simple == "LEAST_CONN":
        r.warn(f"{path}.simple", "LEAST_CONN is deprecated, use LEAST_REQUEST")
    ch = _decode_consistent_hash(r, m["consistentHash"], f"{path}.consistentHash") \
        if m.get("consistentHash") is not None else None
    if m.get("localityLbSetting") is not None:
        if not isinstance(m["localityLbSetting"], dict):
            r.error(f"{path}.localityLbSetting", f"must be a mapping, got {_type_name(m['localityLbSetting'])}")
        else:
            _check_locality(r, m["localityLbSetting"], f"{path}.localityLbSetting")
    warmup = r.duration(m, "warmupDurationSecs", path)
    if m.get("warmup") is not None:
        if m.get("warmupDurationSecs") is not None:
            r.error(path, "only one of warmupDurationSecs, warmup is allowed")
        wm = r.obj(m["warmup"], f"{path}.warmup", "WarmupConfiguration")
        if wm is not None:
            warmup = r.duration(wm, "duration", f"{path}.warmup", required=True)
            pct = wm.get("minimumPercent")
            if pct is not None and (isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100):
                r.error(f"{path}.warmup.minimumPercent", f"must be in [0, 100], got {pct!r}")
            aggression = wm.get("aggression")
            if aggression is not None and (isinstance(aggression, bool) or not isinstance(aggression, (int, float))
                                           or aggression <= 0):
                r.error(f"{path}.warmup.aggression", f"must be > 0, got {aggression!r}")
    if warmup is not None and (ch is not None or (simple and LB_SIMPLE[simple] not in ("ROUND_ROBIN", "LEAST_REQUEST"))):
        r.error(path, "warmup only applies to ROUND_ROBIN and LEAST_REQUEST")
    return LoadBalancerPolicy(simple=LB_SIMPLE[simple] if simple else "LEAST_REQUEST", consistent_hash=ch,
                              warmup=warmup)


def _check_locality(r: _Reader, m: dict, path: str) -> None:
    r.obj(m, path, "LocalityLoadBalancerSetting")
    present = [k for k in ("distribute", "failover", "failoverPriority") if m.get(k)]
    if len(present) > 1 and present != ["failover", "failoverPriority"]:
        r.error(path, f"only one of distribute, failover, failoverPriority is allowed, got {', '.join(present)}")
    for i, item, dp in r.items(m, "distribute", path):
        dm = r.obj(item, dp, "LocalityDistribute")
        if dm is None:
            continue
        to = dm.get("to") or {}
        if not isinstance(to, dict):
            r.error(f"{dp}.to", "must be a mapping of locality to weight")
            continue
        total = 0
        for loc, w in to.items():
            if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 100:
                r.error(f"{dp}.to.{loc}", f"weight must be in [1, 100], got {w!r}")
            else:
                total += w
        if total != 100:
            r.error(f"{dp}.to", f"weights must total 100, got {total}")
    for i, item, fp in r.items(m, "failover", path):
        fm = r.obj(item, fp, "LocalityFailover")
        if fm is not None and fm.get("from") == fm.get("to"):
            r.error(fp, "from and to must differ")


def _decode_consistent_hash(r: _Reader, raw: Any, path: str) -> ConsistentHash | None:
    keys = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
    m = r.obj(raw, path, "ConsistentHashLB")
    if m is None:
        return None
    present = [k for k in keys if m.get(k) is not None and m.get(k) is not False]
    if not present and m.get("useSourceIp") is False:
        # Istio sets the hash key to "source IP: false": nothing to hash, so picks are not sticky
        present = ["none"]
    if len(present) != 1:
        r.error(path, "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is required"
                + (f", got {', '.join(present)}" if present else ""))
        return None
    algorithm, ring = "ring", 1024
    if m.get("ringHash") is not None and m.get("maglev") is not None:
        r.error(path, "only one of ringHash, maglev is allowed")
    if m.get("minimumRingSize") is not None:
        ring = r.integer(m, "minimumRingSize", path, lo=1) or ring
    if m.get("ringHash") is not None:
        rm = r.obj(m["ringHash"], f"{path}.ringHash", "RingHash")
        if rm is not None and rm.get("minimumRingSize") is not None:
            ring = r.integer(rm, "minimumRingSize", f"{path}.ringHash", lo=1) or ring
    if m.get("maglev") is not None:
        algorithm = "maglev"
        mm = r.obj(m["maglev"], f"{path}.maglev", "MagLev", required=("tableSize",))
        if mm is not None:
            size = r.integer(mm, "tableSize", f"{path}.maglev", lo=1, hi=5_000_010)
            if size is not None and not _is_prime(size):
                r.error(f"{path}.maglev.tableSize", f"must be a prime number, got {size}")
            ring = size or ring
    key = present[0]
    if key == "httpHeaderName":
        name = r.string(m, key, path, required=True) or ""
        return ConsistentHash("header", name.lower(), algorithm=algorithm, minimum_ring_size=ring)
    if key == "httpQueryParameterName":
        return ConsistentHash("query", r.string(m, key, path, required=True) or "", algorithm=algorithm,
                              minimum_ring_size=ring)
    if key == "useSourceIp":
        r.boolean(m, key, path)
        return ConsistentHash("source_ip", algorithm=algorithm, minimum_ring_size=ring)
    if key == "none":
        return ConsistentHash("none", algorithm=algorithm, minimum_ring_size=ring)
    cp = f"{path}.httpCookie"
    cm = r.obj(m["httpCookie"], cp, "HTTPCookie")
    if cm is None:
        return None
    name = r.string(cm, "name", cp, required=True) or ""
    seen = set()
    for i, item, ap in r.items(cm, "attributes", cp):
        am = r.obj(item, ap, "CookieAttribute")
        if am is not None:
            aname = r.string(am, "name", ap, required=True)
            if aname in seen:
                r.error(f"{ap}.name", f"duplicate cookie attribute {aname!r}")
            seen.add(aname)
    return ConsistentHash("cookie", name, cookie_ttl=r.duration(cm, "ttl", cp, minimum=0.0),
                          cookie_path=r.string(cm, "path", cp) or "/", algorithm=algorithm, minimum_ring_size=ring)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _limit(value: int | None) -> int | None:
    """A circuit-breaker threshold: 0 means unset (the default applies), as istiod reads
    maxConnections, http1MaxPendingRequests, http2MaxRequests and maxRetries."""
    return value or None


def _decode_connection_pool(r: _Reader, raw: Any, path: str) -> ConnectionPoolPolicy | None:
    m = r.obj(raw, path, "ConnectionPoolSettings")
    if m is None:
        return None
    if m.get("tcp") is None and m.get("http") is None:
        r.error(path, "must set at least one of tcp, http")
    values: dict[str, Any] = {}
    if m.get("tcp") is not None:
        tp = f"{path}.tcp"
        tm = r.obj(m["tcp"], tp, "TCPSettings")
        if tm is not None:
            values["max_connections"] = _limit(r.integer(tm, "maxConnections", tp, lo=0))
            values["connect_timeout"] = r.duration(tm, "connectTimeout", tp)
            values["max_connection_duration"] = r.duration(tm, "maxConnectionDuration", tp)
            values["tcp_idle_timeout"] = r.duration(tm, "idleTimeout", tp, minimum=0.0)
            if tm.get("tcpKeepalive") is not None:
                kp = f"{tp}.tcpKeepalive"
                km = r.obj(tm["tcpKeepalive"], kp, "TcpKeepalive")
                if km is not None:
                    values["tcp_keepalive"] = (r.integer(km, "probes", kp, lo=0) or None,
                                               r.duration(km, "time", kp, minimum=1.0),
                                               r.duration(km, "interval", kp, minimum=1.0))
    if m.get("http") is not None:
        hp = f"{path}.http"
        hm = r.obj(m["http"], hp, "HTTPSettings")
        if hm is not None:
            values["max_pending_requests"] = _limit(r.integer(hm, "http1MaxPendingRequests", hp, lo=0))
            values["max_requests"] = _limit(r.integer(hm, "http2MaxRequests", hp, lo=0))
            r.integer(hm, "maxConcurrentStreams", hp, lo=0)
            values["max_requests_per_connection"] = r.integer(hm, "maxRequestsPerConnection", hp, lo=0)
            values["max_retries"] = _limit(r.integer(hm, "maxRetries", hp, lo=0))
            values["idle_timeout"] = r.duration(hm, "idleTimeout", hp)
            upgrade = r.string(hm, "h2UpgradePolicy", hp, choices=("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"))
            if r.boolean(hm, "useClientProtocol", hp) and upgrade == "UPGRADE":
                r.error(hp, "useClientProtocol and h2UpgradePolicy UPGRADE cannot be used together")
            if hm.get("http2KeepAlive") is not None:
                km = r.obj(hm["http2KeepAlive"], f"{hp}.http2KeepAlive", "HTTP2KeepAlive")
                if km is not None:
                    r.duration(km, "interval", f"{hp}.http2KeepAlive")
                    r.duration(km, "timeout", f"{hp}.http2KeepAlive")
    return ConnectionPoolPolicy(**{k: v for k, v in values.items() if v is not None})


def _decode_outlier(r: _Reader, raw: Any, path: str) -> OutlierPolicy | None:
    m = r.obj(raw, path, "OutlierDetection")
    if m is None:
        return None
    legacy = r.integer(m, "consecutiveErrors", path, lo=0)
    c5xx = r.integer(m, "consecutive5xxErrors", path, lo=0)
    gateway = r.integer(m, "consecutiveGatewayErrors", path, lo=0)
    split = bool(r.boolean(m, "splitExternalLocalOriginErrors", path))
    local = None
    if m.get("consecutiveLocalOriginFailures") is not None:
        local = r.integer(m, "consecutiveLocalOriginFailures", path, lo=0)
        if not split:
            r.error(f"{path}.consecutiveLocalOriginFailures", "requires splitExternalLocalOriginErrors: true")
    codes = []
    max_eject = r.integer(m, "maxEjectionPercent", path, lo=0, hi=100)
    min_health = r.integer(m, "minHealthPercent", path, lo=0, hi=100)
    for i, item, cp in r.items(m, "outlierDetectionHttpErrorCodes", path):
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            r.error(cp, f"must be an HTTP status code, got {item!r}")
        else:
            codes.append(item)
    if c5xx is None:
        c5xx = legacy if legacy is not None else 5      # Envoy's default when outlier detection is on
    return OutlierPolicy(
        consecutive_5xx=c5xx or None, consecutive_gateway_errors=gateway or None,
        interval=r.duration(m, "interval", path) or 10.0,
        base_ejection_time=r.duration(m, "baseEjectionTime", path) or 30.0,
        max_ejection_percent=10 if max_eject is None else max_eject,
        min_health_percent=min_health or 0, split_local_origin=split,
        consecutive_local_origin=(5 if local is None else local) if split else None,
        http_error_codes=frozenset(codes))


def _decode_client_tls(r: _Reader, raw: Any, path: str) -> ClientTLS | None:
    m = r.obj(raw, path, "ClientTLSSettings")
    if m is None:
        return None
    mode = r.string(m, "mode", path, choices=CLIENT_TLS_MODES) or "DISABLE"
    sans = r.str_list(m, "subjectAltNames", path)
    r.string(m, "caCrl", path)                # refused by the field registry (fields.py, ClientTLSSettings)
    credential = r.string(m, "credentialName", path) or ""
    if credential:
        for k in ("clientCertificate", "privateKey", "caCertificates"):
            if m.get(k):
                r.error(f"{path}.{k}", "give either credentialName or the certificate files, not both (Istio)")
    if mode == "ISTIO_MUTUAL":
        for k in ("clientCertificate", "privateKey", "caCertificates", "credentialName"):
            if m.get(k):
                r.error(f"{path}.{k}", "must be empty when mode is ISTIO_MUTUAL")
    if mode == "MUTUAL" and not m.get("credentialName") and not (m.get("clientCertificate") and m.get("privateKey")):
        r.error(path, "MUTUAL needs clientCertificate and privateKey")
    return ClientTLS(mode=mode, client_certificate=r.string(m, "clientCertificate", path) or "",
                     private_key=r.string(m, "privateKey", path) or "",
                     ca_certificates=r.string(m, "caCertificates", path) or "", sni=r.string(m, "sni", path) or "",
                     insecure_skip_verify=bool(r.boolean(m, "insecureSkipVerify", path)), subject_alt_names=sans,
                     credential_name=credential)


# ---------------------------------------------------------------- ServiceEntry


def _decode_port(r: _Reader, raw: Any, path: str, require_protocol: bool = False,
                 require_name: bool = False, node: str = "Port") -> PortSpec | None:
    m = r.obj(raw, path, node)
    if m is None:
        return None
    number = r.port(m, "number", path, required=True)
    protocol = r.string(m, "protocol", path, required=require_protocol)
    if protocol is not None and protocol.upper() not in PROTOCOLS:
        r.error(f"{path}.protocol", f"unknown protocol {protocol!r} (known: {', '.join(sorted(PROTOCOLS))})")
    name = r.string(m, "name", path, required=require_name)
    target = r.port(m, "targetPort", path)
    if number is None:
        return None
    return PortSpec(number=number, protocol=(protocol or "").upper(), name=name or "", target_port=target)


def _decode_service_entry(r: _Reader, raw: Any, namespace: str) -> ServiceEntry | None:
    m = r.obj(raw, "spec", "ServiceEntry")
    if m is None:
        return None
    hosts = r.str_list(m, "hosts", "spec", required=True)
    for i, host in enumerate(hosts):
        _check_host(r, host, f"spec.hosts[{i}]", allow_star=False)
    addresses = r.str_list(m, "addresses", "spec")
    resolution = r.string(m, "resolution", "spec", choices=RESOLUTIONS) or "NONE"
    location = r.string(m, "location", "spec", choices=LOCATIONS) or "MESH_EXTERNAL"
    for i, addr in enumerate(addresses):
        try:
            net = ipaddress.ip_network(addr, strict=False)
        except ValueError:
            r.error(f"spec.addresses[{i}]", f"must be an IP or CIDR, got {addr!r}")
            continue
        if "/" in addr and net.num_addresses > 1 and resolution not in ("NONE", "STATIC"):
            r.error(f"spec.addresses[{i}]", f"CIDR addresses need resolution NONE or STATIC, got {resolution}")
    ports = []
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for i, item, pp in r.items(m, "ports", "spec"):
        spec = _decode_port(r, item, pp, require_name=True, node="ServicePort")
        if spec is None:
            continue
        if spec.name in names:
            r.error(f"{pp}.name", f"duplicate port name {spec.name!r} (also spec.ports[{names[spec.name]}])")
        if spec.number in numbers:
            r.error(f"{pp}.number", f"duplicate port number {spec.number} (also spec.ports[{numbers[spec.number]}])")
        names.setdefault(spec.name, i)
        numbers.setdefault(spec.number, i)
        ports.append(ServicePort(spec.number, spec.name, spec.protocol or "TCP", spec.target_port))
    endpoints = []
    for i, item, ep in r.items(m, "endpoints", "spec"):
        em = r.obj(item, ep, "WorkloadEntry")
        if em is None:
            continue
        address = r.string(em, "address", ep) or ""
        if resolution == "STATIC":
            if not address:
                r.error(f"{ep}.address", "required for resolution STATIC")
            elif not address.startswith("unix://"):
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    r.error(f"{ep}.address", f"must be an IP for resolution STATIC, got {address!r}")
        elif resolution in ("DNS", "DNS_ROUND_ROBIN") and address:
            _check_host(r, address, f"{ep}.address", allow_star=False)
        ep_ports = {}
        raw_ports = em.get("ports")
        if raw_ports is not None:
            if not isinstance(raw_ports, dict):
                r.error(f"{ep}.ports", f"must be a mapping of port name to number, got {_type_name(raw_ports)}")
            else:
                for pname in raw_ports:
                    number = r.port(raw_ports, pname, f"{ep}.ports")
                    if pname not in names:
                        r.error(f"{ep}.ports.{pname}", "is not the name of one of spec.ports")
                    elif number is not None:
                        ep_ports[str(pname)] = number
        endpoints.append(WorkloadEntry(
            address=address, ports=MappingProxyType(ep_ports),
            labels=r.str_map(em, "labels", ep) or MappingProxyType({}), network=r.string(em, "network", ep) or "",
            locality=r.string(em, "locality", ep) or "",
            weight=1 if em.get("weight") is None else (r.integer(em, "weight", ep, lo=0, hi=2**32 - 1) or 0),
            service_account=r.string(em, "serviceAccount", ep) or ""))
    selector = None
    if m.get("workloadSelector") is not None:
        wm = r.obj(m["workloadSelector"], "spec.workloadSelector", "WorkloadSelector")
        if wm is not None:
            selector = r.str_map(wm, "labels", "spec.workloadSelector") or MappingProxyType({})
        if m.get("endpoints"):
            r.error("spec", "only one of workloadSelector, endpoints is allowed")
    if resolution == "NONE" and m.get("endpoints"):
        r.error("spec.endpoints", "must be empty when resolution is NONE")
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not m.get("endpoints"):
        for i, host in enumerate(hosts):
            if host.startswith("*"):
                r.error(f"spec.hosts[{i}]", f"resolution {resolution} without endpoints needs a host name, "
                                            f"not a wildcard ({host!r})")
    if resolution == "DNS_ROUND_ROBIN" and len(m.get("endpoints") or []) > 1:
        r.error("spec.endpoints", "resolution DNS_ROUND_ROBIN allows at most one endpoint")
    if not m.get("ports") and resolution != "NONE":
        r.warn("spec.ports", "no ports: nothing can be routed to this ServiceEntry")
    return ServiceEntry(hosts=hosts, addresses=addresses, ports=tuple(ports), location=location,
                        resolution=resolution, endpoints=tuple(endpoints), workload_selector=selector,
                        export_to=r.str_list(m, "exportTo", "spec"),
                        subject_alt_names=r.str_list(m, "subjectAltNames", "spec"))


# ---------------------------------------------------------------- Gateway


def _decode_gateway(r: _Reader, raw: Any, namespace: str) -> Gateway | None:
    m = r.obj(raw, "spec", "Gateway")
    if m is None:
        return None
    servers = []
    port_names: dict[str, int] = {}
    if not m.get("servers"):
        r.error("spec.servers", "required, must not be empty")
    for i, item, sp in r.items(m, "servers", "spec"):
        sm = r.obj(item, sp, "Server", required=("port",))
        if sm is None:
            continue
        port = _decode_port(r, sm["port"], f"{sp}.port", require_protocol=True) if sm.get("port") else None
        hosts = r.str_list(sm, "hosts", sp, required=True)
        for k, host in enumerate(hosts):
            ns, _, dns = host.rpartition("/")
            if ns and ns not in ("*", ".") and not DNS1123_SUBDOMAIN.match(ns):
                r.error(f"{sp}.hosts[{k}]", f"namespace part must be a namespace, \"*\" or \".\", got {ns!r}")
            _check_host(r, dns, f"{sp}.hosts[{k}]")
        if port is not None and port.name:
            if port.name in port_names:
                r.error(f"{sp}.port.name", f"duplicate port name {port.name!r} (also spec.servers[{port_names[port.name]}])")
            port_names.setdefault(port.name, i)
        tls = _decode_server_tls(r, sm["tls"], f"{sp}.tls") if sm.get("tls") is not None else None
        if port is not None:
            if port.protocol in ("HTTPS", "TLS") and tls is None and sm.get("tls") is None:
                r.error(f"{sp}.tls", f"required for protocol {port.protocol}")
            if port.protocol in ("HTTP", "HTTP2", "GRPC", "TCP") and tls is not None and not (
                    tls.https_redirect and tls == ServerTLS(mode=tls.mode, https_redirect=True)):
                r.error(f"{sp}.tls", f"protocol {port.protocol} cannot have TLS settings (except httpsRedirect)")
        if port is not None:
            servers.append(Server(index=i, port=port, hosts=hosts, bind=r.string(sm, "bind", sp) or "", tls=tls,
                                  default_endpoint=r.string(sm, "defaultEndpoint", sp) or "",
                                  name=r.string(sm, "name", sp) or ""))
    return Gateway(servers=tuple(servers), selector=r.str_map(m, "selector", "spec") or MappingProxyType({}))


def _decode_server_tls(r: _Reader, raw: Any, path: str) -> ServerTLS | None:
    m = r.obj(raw, path, "ServerTLSSettings")
    if m is None:
        return None
    redirect = bool(r.boolean(m, "httpsRedirect", path))
    mode = r.string(m, "mode", path, choices=SERVER_TLS_MODES)
    versions = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")
    tls = ServerTLS(
        mode=mode or ("SIMPLE" if not redirect else ""), https_redirect=redirect,
        server_certificate=r.string(m, "serverCertificate", path) or "",
        private_key=r.string(m, "privateKey", path) or "", ca_certificates=r.string(m, "caCertificates", path) or "",
        credential_name=r.string(m, "credentialName", path) or "",
        credential_names=r.str_list(m, "credentialNames", path),
        subject_alt_names=r.str_list(m, "subjectAltNames", path),
        min_protocol_version=r.string(m, "minProtocolVersion", path, choices=versions) or "",
        max_protocol_version=r.string(m, "maxProtocolVersion", path, choices=versions) or "",
        cipher_suites=r.str_list(m, "cipherSuites", path),
        verify_spki=_spki_pins(r, m, path), verify_hash=_hash_pins(r, m, path))
    r.string(m, "caCrl", path)
    if tls.mode not in CLIENT_VERIFYING_MODES:
        for key in ("subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash"):
            if m.get(key):
                r.error(f"{path}.{key}", f"checks client certificates, which mode {tls.mode or 'unset'} does not ask "
                                         "for: use MUTUAL, OPTIONAL_MUTUAL or ISTIO_MUTUAL")
        if tls.ca_certificates and tls.mode in ("SIMPLE", "PASSTHROUGH"):
            r.warn(f"{path}.caCertificates", f"only verifies client certificates (MUTUAL modes); mode {tls.mode} "
                                             "asks for none, so it is not used")
    order = {v: k for k, v in enumerate(versions)}
    if tls.min_protocol_version not in ("", "TLS_AUTO") and tls.max_protocol_version not in ("", "TLS_AUTO") \
            and order[tls.min_protocol_version] > order[tls.max_protocol_version]:
        r.error(f"{path}.minProtocolVersion", f"{tls.min_protocol_version} is above maxProtocolVersion "
                                              f"{tls.max_protocol_version}")
    for k, suite in enumerate(tls.cipher_suites):
        if not _known_cipher(suite):
            r.error(f"{path}.cipherSuites[{k}]", f"unknown cipher suite {suite!r} (OpenSSL names, e.g. "
                                                 "ECDHE-RSA-AES128-GCM-SHA256)")
    has_creds = bool(tls.credential_name or tls.credential_names)
    if tls.credential_name:
        for k in ("serverCertificate", "privateKey"):
            if m.get(k):
                r.error(f"{path}.{k}", "give either credentialName or serverCertificate and privateKey, not both")
    if tls.mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL") and not has_creds and m.get("tlsCertificates") is None:
        for k in ("serverCertificate", "privateKey"):
            if not m.get(k):
                r.error(f"{path}.{k}", f"required for mode {tls.mode} without credentialName")
        if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL") and not tls.ca_certificates:
            r.error(f"{path}.caCertificates", f"required for mode {tls.mode} without credentialName")
    if tls.mode == "ISTIO_MUTUAL":
        for k in ("serverCertificate", "privateKey", "caCertificates", "credentialName"):
            if m.get(k):
                r.error(f"{path}.{k}", "must be empty when mode is ISTIO_MUTUAL")
    return tls


def _spki_pins(r: _Reader, m: dict, path: str) -> tuple[str, ...]:
    """verifyCertificateSpki: base64 SHA-256 digests of SubjectPublicKeyInfo (Envoy's format)."""
    pins = r.str_list(m, "verifyCertificateSpki", path)
    for k, pin in enumerate(pins):
        try:
            ok = len(base64.b64decode(pin, validate=True)) == 32
        except ValueError:
            ok = False
        if not ok:
            r.error(f"{path}.verifyCertificateSpki[{k}]", "must be the base64 SHA-256 digest of a public key "
                                                        "(44 characters, e.g. `openssl x509 -pubkey | openssl pkey "
                                                        "-pubin -outform DER | openssl dgst -sha256 -binary | base64`)")
    return pins


def _hash_pins(r: _Reader, m: dict, path: str) -> tuple[str, ...]:
    """verifyCertificateHash: hex SHA-256 of the DER certificate, colons allowed (normalised away)."""
    pins = r.str_list(m, "verifyCertificateHash", path)
    out = []
    for k, pin in enumerate(pins):
        digits = pin.replace(":", "").lower()
        if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
            r.error(f"{path}.verifyCertificateHash[{k}]", "must be a hex SHA-256 digest of the certificate (64 hex "
                                                        "digits, colons allowed), got " + repr(pin))
        out.append(digits)
    return tuple(out)


def _known_cipher(name: str) -> bool:
    """A TLS 1.2-or-older cipher suite OpenSSL knows by this name (what ``set_ciphers`` takes)."""
    if not name or any(c in name for c in ":!+@ ") or name.isupper() and "-" not in name:
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(name)
    except ssl.SSLError:
        return False
    return True


# ---------------------------------------------------------------- Secret (core v1)

SECRET_TYPES = ("kubernetes.io/tls", "Opaque")
# Istio's two spellings of a TLS Secret's keys: kubernetes.io/tls ones, and the generic ones
_SECRET_KEYS = {"tls.crt": "certificate", "cert": "certificate", "tls.key": "key", "key": "key",
                "ca.crt": "ca", "cacert": "ca"}


# set by the control plane on a Secret it does not give this proxy (its identity is not granted):
# metadata only, and the reason, so the gateway can say why it does not serve the server
WITHHELD_ANNOTATION = "meshproxy.io/secret-withheld"


def _decode_secret(r: _Reader, body: dict, namespace: str, withheld: str = "") -> SecretSpec | None:
    """A TLS Secret: ``data`` (base64) and ``stringData`` (plain, wins, as the API server merges
    them) holding a PEM certificate chain and its key, and/or a CA bundle (``ca.crt``, the whole
    content of a ``<name>-cacert`` Secret).  Errors name the key, never the content.  A Secret
    the control plane withheld (``meshproxy.io/secret-withheld``) carries no data, only why."""
    kind = r.string(body, "type", "type") or "Opaque"
    if kind not in SECRET_TYPES:
        r.error("type", f"must be one of {', '.join(SECRET_TYPES)} (TLS credentials for Gateway credentialName), "
                        f"got {kind!r}")
    if withheld:
        if body.get("data") or body.get("stringData"):
            r.error(f"metadata.annotations.{WITHHELD_ANNOTATION}", "a withheld Secret carries no data")
        return SecretSpec(type=kind, withheld=withheld)
    values: dict[str, bytes] = {}
    for key, item, where in (("data", body.get("data"), "data"), ("stringData", body.get("stringData"), "stringData")):
        if item is None:
            continue
        if not isinstance(item, dict):
            r.error(where, f"must be a mapping, got {_type_name(item)}")
            continue
        for name, value in item.items():
            path = f"{where}.{name}"
            if not isinstance(value, str):
                r.error(path, f"must be a string, got {_type_name(value)}")
                continue
            if key == "data":
                try:
                    values[name] = base64.b64decode(value, validate=True)
                except ValueError:
                    r.error(path, "must be base64 (data holds base64; plain text goes in stringData)")
                    continue
            else:
                values[name] = value.encode()
    found: dict[str, tuple[str, bytes]] = {}
    for name, value in values.items():
        role = _SECRET_KEYS.get(name)
        if role is None:
            r.warn(f"data.{name}", "not a TLS key this proxy reads (tls.crt, tls.key, ca.crt; or cert, key, cacert); "
                                   "ignored")
            continue
        if role in found and found[role][0] != name:
            r.error(f"data.{name}", f"the same as data.{found[role][0]}: give one of them")
        found[role] = (name, value)
    cert, key, ca = (found.get(role, ("", b"")) for role in ("certificate", "key", "ca"))
    if kind == "kubernetes.io/tls":
        for role, (name, _) in (("tls.crt", cert), ("tls.key", key)):
            if not name:
                r.error(f"data.{role}", "required for type kubernetes.io/tls")
    if bool(cert[0]) != bool(key[0]):
        r.error(f"data.{cert[0] or 'tls.crt'}" if not cert[0] else f"data.{key[0] or 'tls.key'}",
                "a certificate and its key come together")
    if not (cert[0] or ca[0]) and not r.errors:
        r.error("data", "holds no TLS credential (tls.crt and tls.key, and/or ca.crt)")
    if cert[0] and key[0]:
        _check_key_pair(r, cert, key)
    if ca[0]:
        _check_pem_certificates(r, ca)
    return SecretSpec(type=kind, certificate=cert[1], key=key[1], ca=ca[1])


def _check_pem_certificates(r: _Reader, item: tuple[str, bytes]):
    from cryptography import x509
    try:
        return x509.load_pem_x509_certificates(item[1])
    except ValueError:
        r.error(f"data.{item[0]}", "must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
        return None


def _check_key_pair(r: _Reader, cert: tuple[str, bytes], key: tuple[str, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization
    chain = _check_pem_certificates(r, cert)
    try:
        private = serialization.load_pem_private_key(key[1], None)
    except (ValueError, TypeError):
        r.error(f"data.{key[0]}", "must hold an unencrypted PEM private key")
        return
    if chain:
        spki = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if spki(chain[0].public_key()) != spki(private.public_key()):
            r.error(f"data.{key[0]}", f"is not the key of the first certificate in data.{cert[0]}")


# ---------------------------------------------------------------- Sidecar

_ENDPOINT = re.compile(r"^(127\.0\.0\.1|0\.0\.0\.0|\[::1\]|\[::\]):(\d{1,5})$")


def _decode_sidecar(r: _Reader, raw: Any, namespace: str) -> Sidecar | None:
    m = r.obj(raw, "spec", "Sidecar")
    if m is None:
        return None
    selector = None
    if m.get("workloadSelector") is not None:
        wm = r.obj(m["workloadSelector"], "spec.workloadSelector", "WorkloadSelector")
        if wm is not None:
            selector = r.str_map(wm, "labels", "spec.workloadSelector") or MappingProxyType({})
    ingress = []
    ports_seen: dict[int, int] = {}
    for i, item, ip in r.items(m, "ingress", "spec"):
        im = r.obj(item, ip, "IstioIngressListener",
                   required=("port",))
        if im is None or im.get("port") is None:
            continue
        port = _decode_port(r, im["port"], f"{ip}.port", require_protocol=True)
        endpoint = r.string(im, "defaultEndpoint", ip) or ""
        if endpoint and not endpoint.startswith("unix://"):
            em = _ENDPOINT.match(endpoint)
            if em is None or not 1 <= int(em.group(2)) <= 65535:
                r.error(f"{ip}.defaultEndpoint", "must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT "
                                                 f"or unix://path, got {endpoint!r}")
        if im.get("tls") is not None:
            _decode_server_tls(r, im["tls"], f"{ip}.tls")
        if im.get("connectionPool") is not None:
            _decode_connection_pool(r, im["connectionPool"], f"{ip}.connectionPool")
        if port is not None:
            if port.number in ports_seen:
                r.error(f"{ip}.port.number", f"duplicate port {port.number} (also spec.ingress[{ports_seen[port.number]}])")
            ports_seen.setdefault(port.number, i)
            ingress.append(IngressListener(index=i, port=port, bind=r.string(im, "bind", ip) or "",
                                           capture_mode=r.string(im, "captureMode", ip, choices=CAPTURE_MODES)
                                           or "DEFAULT", default_endpoint=endpoint))
    egress = []
    raw_egress = m.get("egress") if isinstance(m.get("egress"), list) else []
    for i, item, ep in r.items(m, "egress", "spec"):
        em = r.obj(item, ep, "IstioEgressListener")
        if em is None:
            continue
        port = _decode_port(r, em["port"], f"{ep}.port") if em.get("port") is not None else None
        hosts = r.str_list(em, "hosts", ep, required=True)
        for k, host in enumerate(hosts):
            ns, slash, dns = host.partition("/")
            if not slash:
                r.error(f"{ep}.hosts[{k}]", f'must be "namespace/dnsName", got {host!r}')
                continue
            if ns not in ("*", ".", "~") and not DNS1123_SUBDOMAIN.match(ns):
                r.error(f"{ep}.hosts[{k}]", f'namespace must be a name, "*", "." or "~", got {ns!r}')
            _check_host(r, dns, f"{ep}.hosts[{k}]")
        if port is None and i != len(raw_egress) - 1:
            r.error(ep, "only the last egress listener may omit port")
        egress.append(EgressListener(index=i, hosts=hosts, port=port, bind=r.string(em, "bind", ep) or "",
                                     capture_mode=r.string(em, "captureMode", ep, choices=CAPTURE_MODES)
                                     or "DEFAULT"))
    if m.get("inboundConnectionPool") is not None:
        _decode_connection_pool(r, m["inboundConnectionPool"], "spec.inboundConnectionPool")
    mode = "ALLOW_ANY"
    if m.get("outboundTrafficPolicy") is not None:
        om = r.obj(m["outboundTrafficPolicy"], "spec.outboundTrafficPolicy", "OutboundTrafficPolicy")
        if om is not None:
            mode = r.string(om, "mode", "spec.outboundTrafficPolicy", choices=("REGISTRY_ONLY", "ALLOW_ANY")) \
                or "ALLOW_ANY"
            if om.get("egressProxy") is not None:
                _decode_destination(r, om["egressProxy"], "spec.outboundTrafficPolicy.egressProxy")
    return Sidecar(workload_selector=selector, ingress=tuple(ingress), egress=tuple(egress), outbound_mode=mode)


_SPEC_DECODERS: dict[str, Callable[[_Reader, Any, str], Any]] = {
    "VirtualService": _decode_virtual_service,
    "DestinationRule": _decode_destination_rule,
    "ServiceEntry": _decode_service_entry,
    "Gateway": _decode_gateway,
    "Sidecar": _decode_sidecar,
    **SECURITY_DECODERS,
}
