"""Adapter between the control plane and the proxy's decode boundary.

The API validates every object before it is stored, with the same decoder the proxy uses
(``meshproxy.config.decode.decode_documents``), so a resource that the API accepts is one a
proxy can decode.  The control plane adds only what is the API server's job in Kubernetes:
metadata checks (name / namespace syntax, kind and apiVersion against the URL).

This is the only module that names the decoder; if its API moves, only this file changes.
"""
from __future__ import annotations

import re

from .resources import BY_KIND, CONTENT_FIELDS, describe, proxy_view

from meshproxy.config.compile import ProxyIdentity as _ProxyIdentity
from meshproxy.config.compile import WorkloadEndpoint as _WorkloadEndpoint
from meshproxy.config.compile import compile_snapshot as _compile_snapshot
from meshproxy.config.decode import decode_documents as _decode_documents
from meshproxy.config.model import ProxySettings as _ProxySettings
from meshproxy.config.resources import Document as _Document
from meshproxy.config.yaml12 import load as load_yaml, load_all as load_yaml_all  # noqa: F401 (YAML as Kubernetes reads it)

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_metadata(obj: dict, kind: str, namespace: str, name: str | None) -> list[str]:
    """API-server checks: apiVersion, kind, metadata.name/namespace vs the URL."""
    errors: list[str] = []
    where = describe(kind, namespace, (obj.get("metadata") or {}).get("name") or name or "?")
    api_version = obj.get("apiVersion")
    served = BY_KIND[kind]
    if api_version is not None and not served.serves(api_version):
        errors.append(f"{where}: apiVersion: must be one of {served.group}/{'|'.join(served.versions)}, "
                      f"got {api_version!r}")
    if obj.get("kind") not in (None, kind):
        errors.append(f"{where}: kind: must be {kind} for this URL, got {obj.get('kind')!r}")
    md = obj.get("metadata")
    if not isinstance(md, dict):
        errors.append(f"{where}: metadata: must be a mapping")
        md = {}
    obj_name = md.get("name")
    if not isinstance(obj_name, str) or not obj_name:
        errors.append(f"{where}: metadata.name: required")
    elif not DNS1123_SUBDOMAIN.match(obj_name):
        errors.append(f"{where}: metadata.name: must be a lower-case DNS-1123 subdomain, got {obj_name!r}")
    elif name is not None and obj_name != name:
        errors.append(f"{where}: metadata.name: does not match the name in the URL ({name!r})")
    obj_ns = md.get("namespace")
    if obj_ns is not None and obj_ns != namespace:
        errors.append(f"{where}: metadata.namespace: does not match the namespace in the URL ({namespace!r})")
    elif not DNS1123_LABEL.match(namespace):
        errors.append(f"{where}: metadata.namespace: must be a DNS-1123 label, got {namespace!r}")
    for field in ("labels", "annotations"):
        value = md.get(field)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            errors.append(f"{where}: metadata.{field}: must be a mapping of strings")
    if kind in CONTENT_FIELDS:                   # a Secret: type and data, no spec
        allowed = {"apiVersion", "kind", "metadata", "stringData", *CONTENT_FIELDS[kind]}
        errors += [f"{where}: {key}: unknown field" for key in obj if key not in allowed]
    elif not isinstance(obj.get("spec"), dict):
        errors.append(f"{where}: spec: required, must be a mapping")
    return errors


def validate_object(obj: dict, kind: str, namespace: str, name: str | None = None) -> list[str]:
    """Every problem with ``obj`` as one line each ("Kind ns/name: path: message"); [] if valid."""
    errors = check_metadata(obj, kind, namespace, name)
    if errors:
        return errors
    return decode_errors([proxy_view(obj)])


def decode_errors(objects: list[dict], source: str = "controlplane") -> list[str]:
    """Run the proxy's decoder over proxy views; returns its errors (path-qualified)."""
    docs = [_Document(source, i, obj) for i, obj in enumerate(objects)]
    return list(_decode_documents(docs).errors)


def decode_warnings(obj: dict) -> list[str]:
    """The decoder's warnings for one proxy view: fields accepted but not applied, with paths."""
    return list(_decode_documents([_Document("controlplane", 0, obj)]).warnings)


def apply_warnings(obj: dict, others: list[dict], workloads: list[dict]) -> list[str]:
    """What the compiler would warn about ``obj`` once stored next to ``others`` (proxy views):
    e.g. a route to a subset no DestinationRule defines (a 503 for every such request).
    Compiled as a sidecar of the object's namespace and as each Gateway's proxy; only
    warnings that name ``obj`` are returned.  Workloads are reduced to one per distinct
    (service, labels, ports), which is all the compiler's warnings depend on."""
    md = obj["metadata"]
    ref = f"{obj['kind']} {md['namespace']}/{md['name']}: "
    decoded = _decode_documents([_Document("controlplane", i, o) for i, o in enumerate([*others, obj])])
    distinct = {(w["namespace"], w["service"], tuple(sorted(w["labels"].items())), tuple(sorted(w["ports"].items()))): w
                for w in workloads}
    endpoints = [_WorkloadEndpoint(w["service"], w["namespace"], w["address"], w["ports"], w["labels"])
                 for w in distinct.values()]
    identities = [(md["namespace"], "sidecar", {})]
    for o in [*others, obj]:
        if o["kind"] == "Gateway":
            identities.append((o["metadata"]["namespace"], "gateway", dict(o["spec"].get("selector") or {})))
    warnings: list[str] = []
    for namespace, mode, labels in identities:
        identity = _ProxyIdentity(namespace=namespace, labels=labels, mode=mode,
                                  http_listen=("127.0.0.1", 0), gateway_bind="127.0.0.1")
        result = _compile_snapshot(decoded.resources, identity, _ProxySettings(), workloads=endpoints, version="check")
        warnings += [w for w in result.warnings if w.startswith(ref) and w not in warnings]
    return warnings
