"""OpenAPI documents for the served kinds, as kubectl reads them.

``GET /openapi/v3`` lists one document per group/version; each document has, per kind, the
paths kubectl looks for (with ``x-kubernetes-group-version-kind`` on every operation, and the
PATCH operation advertising ``fieldValidation`` and the patch media types a custom resource
takes) and a ``components.schemas`` entry for the kind.  With ``fieldValidation`` advertised,
``kubectl apply`` asks the server to validate strictly (``?fieldValidation=Strict``), which the
API always does: the decoder rejects unknown fields whatever the parameter says.

The ``spec`` schema comes from :func:`spec_schema`: the field registry of the decoder when it
describes the kind, else an object that keeps unknown fields (the decoder still validates).
"""
from __future__ import annotations

import hashlib
import json

from .resources import CORE_KINDS, GROUPS, Kind

PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml")
CORE_PATCH = ("application/strategic-merge-patch+json",)    # kubectl's client-side apply of built-in kinds
_OBJECT_META = {"type": "object", "description": "Standard object's metadata.",
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                               "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                               "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                               "resourceVersion": {"type": "string"}, "generation": {"type": "integer"},
                               "creationTimestamp": {"type": "string", "format": "date-time"},
                               "managedFields": {"type": "array", "items": {"type": "object",
                                                 "x-kubernetes-preserve-unknown-fields": True}}}}


def spec_schema(kind: Kind) -> dict:
    try:
        from meshproxy.config.fields import openapi_spec_schema   # the decoder's field registry
    except ImportError:
        openapi_spec_schema = None
    if openapi_spec_schema is not None:
        schema = openapi_spec_schema(kind.kind)
        if schema:
            return schema
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
            "description": f"Configuration for {kind.kind} (validated by the server's decoder)."}


def _gvk(kind: Kind, version: str) -> list[dict]:
    return [{"group": kind.group, "version": version, "kind": kind.kind}]


def _schema_name(kind: Kind, version: str) -> str:
    if not kind.group:
        return f"io.k8s.api.core.{version}.{kind.kind}"
    reversed_group = ".".join(reversed(kind.group.split(".")))
    return f"{reversed_group}.{version}.{kind.kind}"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _params(*names: str) -> list[dict]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": True} for n in names]


def _kind_paths(kind: Kind, version: str) -> dict:
    gvk = _gvk(kind, version)
    name = _schema_name(kind, version)
    body = {"content": {"application/json": {"schema": _ref(name)}, "application/yaml": {"schema": _ref(name)}}}
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(name)}}}}
    ok_list = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    base = kind.base_path(version)
    ns_path = {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}}
    name_path = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    list_params = _params("labelSelector", "fieldSelector", "limit", "continue", "resourceVersion",
                          "timeoutSeconds", "watch", "allowWatchBookmarks")
    write_params = _params("dryRun", "fieldManager", "fieldValidation")

    def op(action: str, extra: dict) -> dict:
        return {"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk[0], **extra}

    paths = {
        f"{base}/{kind.plural}": {
            "get": op("list", {"parameters": list_params, "responses": ok_list})},
        f"{base}/namespaces/{{namespace}}/{kind.plural}": {
            "parameters": [ns_path],
            "get": op("list", {"parameters": list_params, "responses": ok_list}),
            "post": op("post", {"parameters": write_params, "requestBody": body, "responses": ok})},
        f"{base}/namespaces/{{namespace}}/{kind.plural}/{{name}}": {
            "parameters": [ns_path, name_path],
            "get": op("get", {"responses": ok}),
            "put": op("put", {"parameters": write_params, "requestBody": body, "responses": ok}),
            "patch": op("patch", {"parameters": [*write_params, *_params("force")], "responses": ok,
                                  "requestBody": {"content": {t: {"schema": {"type": "object"}} for t in
                                                              PATCH_TYPES + (() if kind.group else CORE_PATCH)}}}),
            "delete": op("delete", {"parameters": _params("dryRun", "resourceVersion"), "responses": ok})},
    }
    if "patch" not in kind.verbs:                   # served by its own module without PATCH
        del paths[f"{base}/namespaces/{{namespace}}/{kind.plural}/{{name}}"]["patch"]
    return paths


def _kind_schema(kind: Kind, version: str) -> dict:
    if not kind.group:                              # a Secret: type and data, no spec
        strings = {"type": "object", "additionalProperties": {"type": "string"}}
        return {"type": "object", "x-kubernetes-group-version-kind": _gvk(kind, version),
                "description": "Secret holds a TLS credential (Gateway credentialName); its data is never shown.",
                "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _OBJECT_META,
                               "type": {"type": "string", "enum": ["kubernetes.io/tls", "Opaque"]},
                               "data": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"}},
                               "stringData": strings, "immutable": {"type": "boolean"}}}
    return {"type": "object", "x-kubernetes-group-version-kind": _gvk(kind, version),
            "description": f"{kind.kind} ({kind.group}/{version}), as Istio defines it.",
            "required": ["spec"],
            "properties": {"apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."},
                           "kind": {"type": "string", "description": "Kind is a string value representing the REST resource this object represents."},
                           "metadata": _OBJECT_META, "spec": spec_schema(kind),
                           "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}


def v3_document(group: str, version: str) -> dict | None:
    kinds = [k for k in GROUPS.get(group, ()) if version in k.versions]
    if not kinds:
        return None
    paths: dict = {}
    schemas: dict = {}
    for kind in kinds:
        paths |= _kind_paths(kind, version)
        schemas[_schema_name(kind, version)] = _kind_schema(kind, version)
    return {"openapi": "3.0.0", "info": {"title": "meshproxy control plane", "version": "v1"},
            "paths": paths, "components": {"schemas": schemas}}


def v3_core_document(version: str) -> dict | None:
    kinds = [k for k in CORE_KINDS if version in k.versions]
    if not kinds:
        return None
    paths: dict = {}
    schemas: dict = {}
    for kind in kinds:
        paths |= _kind_paths(kind, version)
        schemas[_schema_name(kind, version)] = _kind_schema(kind, version)
    return {"openapi": "3.0.0", "info": {"title": "meshproxy control plane", "version": "v1"},
            "paths": paths, "components": {"schemas": schemas}}


def v3_paths() -> dict:
    out = {}
    doc = json.dumps(v3_core_document("v1"), sort_keys=True).encode()
    out["api/v1"] = {"serverRelativeURL": f"/openapi/v3/api/v1?hash={hashlib.sha256(doc).hexdigest()[:32].upper()}"}
    for group, kinds in GROUPS.items():
        for version in dict.fromkeys(v for k in kinds for v in k.versions):
            doc = json.dumps(v3_document(group, version), sort_keys=True).encode()
            digest = hashlib.sha256(doc).hexdigest()[:32].upper()
            out[f"apis/{group}/{version}"] = {"serverRelativeURL": f"/openapi/v3/apis/{group}/{version}?hash={digest}"}
    return {"paths": out}
