"""The HTTP API: Kubernetes-style resources, history/rollback, registry, push streams.

Routes (``{g}/{v}`` is any group/version :mod:`.resources` serves, e.g. networking.istio.io/v1;
objects are always stored as given; conventions in :mod:`.kube`):

  GET    /version, /api, /api/v1, /apis, /apis/{g}, /apis/{g}/{v}         discovery
  GET    /openapi/v3, /openapi/v3/apis/{g}/{v}                            OpenAPI v3 (schemas of the kinds)
  GET    /apis/{g}/{v}/{plural}                                 list, all namespaces (?watch=true streams)
  GET    /apis/{g}/{v}/namespaces/{ns}/{plural}                 list (?watch=true streams)
         list and watch take labelSelector, fieldSelector (metadata.name/namespace), limit/continue;
         watch takes resourceVersion (resume; 410 when older than the history), allowWatchBookmarks,
         timeoutSeconds; Accept: ...;as=Table;g=meta.k8s.io answers a Table (kubectl get)
  POST   /apis/{g}/{v}/namespaces/{ns}/{plural}                 create (409 if it exists)
  GET    /apis/{g}/{v}/namespaces/{ns}/{plural}/{n}             get
  PUT    /apis/{g}/{v}/namespaces/{ns}/{plural}/{n}             create or update; with
                                                                metadata.resourceVersion: 409 if stale
  PATCH  /apis/{g}/{v}/namespaces/{ns}/{plural}/{n}             merge patch, JSON patch, server-side apply
                                                                (?fieldManager=&force=); strategic: 415
  DELETE /apis/{g}/{v}/namespaces/{ns}/{plural}/{n}             (?resourceVersion= precondition)
  ?dryRun=All on POST/PUT/PATCH/DELETE validates and answers without writing.

  GET    /history?limit=N                     accepted changes, newest first
  POST   /history/{revision}/rollback         make the resources what they were at that revision
         ?includeSecurity=true (needed when PeerAuthentication/AuthorizationPolicy would change), ?dryRun=All

  POST   /registry/v1/workloads               register {service, namespace, address, ports, labels, id?, ttl?, node_id?, proxy_port?}
  POST   /registry/v1/workloads/{id}/heartbeat
  DELETE /registry/v1/workloads/{id}
  GET    /registry/v1/workloads
  GET    /registry/v1/namespaces/{ns}/services/{svc}/endpoints

  POST   /push/v1/stream   {node_id, identity, resources_version?, endpoints_version?} -> NDJSON stream
  POST   /push/v1/ack      {node_id, nonce, version, errors, rejected?, applied?} | {node_id, nonce, resync: true}
  GET    /push/v1/proxies  (?local=true: only this replica's)
  GET    /metrics          Prometheus text (pilot_xds, pilot_proxy_convergence_time, pilot_total_xds_rejects...)

Bodies are JSON or YAML (either content type; sniffed).  Errors are Kubernetes Status objects.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid

import yaml

from . import kube
from .http import Request, Response, StreamResponse
from .push import PushEngine, expires_at
from .security.service import ROUTES as SECURITY_ROUTES, Denied
from .resources import (BY_KIND, BY_PLURAL, CORE_GROUP, CORE_KINDS, SECURITY_GROUP, Kind, content_of, describe,
                        is_secret, kind_for, proxy_view, redacted, scrub_annotations)
from .store import CHANGED_RESOURCES, BadRequest, ConfigStore, NotFound, StoreError
from .validation import apply_warnings, decode_warnings, load_yaml, validate_object

DEFAULT_TTL = 10.0
WARNINGS_MAX_OBJECTS = 3000     # above this many resources + workloads, writes skip the warning compile
WATCH_HISTORY = 100_000         # history entries a watch may replay to resume from a resourceVersion
_GV = r"(?P<group>[a-z0-9.-]+)/(?P<version>v[a-z0-9]+)"
_NS = r"namespaces/(?P<ns>[^/]+)"
_CORE = "|".join(k.plural for k in CORE_KINDS)
ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p), h) for m, p, h in [
        ("GET", r"^/healthz$", "healthz"),
        ("GET", r"^/metrics$", "metrics"),
        ("GET", r"^/version/?$", "version"),
        ("GET", r"^/api/?$", "core_versions"),
        ("GET", r"^/api/v1/?$", "core_resources"),
        ("GET", r"^/api/v1/namespaces$", "namespaces"),
        ("GET", r"^/api/v1/namespaces/(?P<name>[^/]+)$", "namespace"),
        # core v1 Secrets (TLS credentials for Gateway credentialName): writes need scope admin
        ("GET", rf"^/api/(?P<version>v1)/(?P<plural>{_CORE})$", "core_list_all"),
        ("GET", rf"^/api/(?P<version>v1)/{_NS}/(?P<plural>{_CORE})$", "core_list"),
        ("POST", rf"^/api/(?P<version>v1)/{_NS}/(?P<plural>{_CORE})$", "core_create"),
        ("GET", rf"^/api/(?P<version>v1)/{_NS}/(?P<plural>{_CORE})/(?P<name>[^/]+)$", "core_get"),
        ("PUT", rf"^/api/(?P<version>v1)/{_NS}/(?P<plural>{_CORE})/(?P<name>[^/]+)$", "core_replace"),
        ("PATCH", rf"^/api/(?P<version>v1)/{_NS}/(?P<plural>{_CORE})/(?P<name>[^/]+)$", "core_patch"),
        ("DELETE", rf"^/api/(?P<version>v1)/{_NS}/(?P<plural>{_CORE})/(?P<name>[^/]+)$", "core_delete"),
        ("GET", r"^/apis/?$", "groups"),
        ("GET", r"^/apis/(?P<group>[a-z0-9.-]+)/?$", "group"),
        ("GET", rf"^/apis/{_GV}/?$", "resource_list"),
        ("GET", r"^/openapi/v3/?$", "openapi_paths"),
        ("GET", rf"^/openapi/v3/apis/{_GV}$", "openapi_group_version"),
        ("GET", r"^/openapi/v3/api/(?P<version>v1)$", "openapi_core"),
        ("GET", rf"^/apis/{_GV}/(?P<plural>[a-z0-9]+)$", "list_all"),
        ("GET", rf"^/apis/{_GV}/{_NS}/(?P<plural>[a-z0-9]+)$", "list"),
        ("POST", rf"^/apis/{_GV}/{_NS}/(?P<plural>[a-z0-9]+)$", "create"),
        ("GET", rf"^/apis/{_GV}/{_NS}/(?P<plural>[a-z0-9]+)/(?P<name>[^/]+)$", "get"),
        ("PUT", rf"^/apis/{_GV}/{_NS}/(?P<plural>[a-z0-9]+)/(?P<name>[^/]+)$", "replace"),
        ("PATCH", rf"^/apis/{_GV}/{_NS}/(?P<plural>[a-z0-9]+)/(?P<name>[^/]+)$", "patch"),
        ("DELETE", rf"^/apis/{_GV}/{_NS}/(?P<plural>[a-z0-9]+)/(?P<name>[^/]+)$", "delete"),
        ("GET", r"^/history$", "history"),
        ("POST", r"^/history/(?P<revision>\d+)/rollback$", "rollback"),
        ("POST", r"^/registry/v1/workloads$", "register"),
        ("GET", r"^/registry/v1/workloads$", "workloads"),
        ("POST", r"^/registry/v1/workloads/(?P<wid>[^/]+)/heartbeat$", "heartbeat"),
        ("DELETE", r"^/registry/v1/workloads/(?P<wid>[^/]+)$", "deregister"),
        ("GET", r"^/registry/v1/namespaces/(?P<ns>[^/]+)/services/(?P<svc>[^/]+)/endpoints$", "endpoints"),
        ("POST", r"^/push/v1/stream$", "stream"),
        ("POST", r"^/push/v1/ack$", "ack"),
        ("GET", r"^/push/v1/proxies$", "proxies"),
    ]]


def status(code: int, reason: str, message: str, *, details: dict | None = None) -> Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return Response.json(code, body)


def invalid(kind: str, namespace: str, name: str, errors: list[str], group: str = "") -> Response:
    causes = []
    prefix = f"{describe(kind, namespace, name)}: "
    for error in errors:
        rest = error[len(prefix):] if error.startswith(prefix) else error
        field, sep, message = rest.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "field": field if sep else "", "message": error})
    return status(422, "Invalid", f"{describe(kind, namespace, name)} is invalid: " + "; ".join(errors),
                  details={"name": name, "group": group, "kind": kind, "causes": causes})


def parse_body(request: Request):
    text = request.body.decode("utf-8", "replace").strip()
    if not text:
        raise BadRequest("request body is empty")
    try:
        return json.loads(text) if text[:1] in "{[" else load_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise BadRequest(f"request body is neither valid JSON nor YAML: {exc}") from None


def _secret_body(body: dict, existing: dict | None) -> dict:
    """A Secret as the API server stores it: ``stringData`` folded into ``data`` (base64), kubectl's
    last-applied copy of the data dropped, and a write that names no data keeping the stored data
    (what ``kubectl get -o yaml | kubectl replace -f -`` sends, since reads never show it)."""
    import base64
    if not isinstance(body, dict):
        return body
    body = dict(body)
    string_data = body.pop("stringData", None)
    if isinstance(string_data, dict):
        data = dict(body.get("data") or {}) if isinstance(body.get("data") or {}, dict) else body.get("data")
        if isinstance(data, dict):
            for key, value in string_data.items():
                data[key] = base64.b64encode(value.encode()).decode() if isinstance(value, str) else value
            body["data"] = data
    elif string_data is not None:
        body["stringData"] = string_data          # the decoder reports its type
    if "data" not in body and "stringData" not in body and existing is not None and existing.get("data"):
        body["data"] = existing["data"]
    md = body.get("metadata")
    if isinstance(md, dict) and isinstance(md.get("annotations"), dict):
        body["metadata"] = dict(md, annotations=scrub_annotations(md["annotations"]))
    return body


def _without_directives(patch):
    """A strategic merge patch without kubectl's ``$setElementOrder``/``$retainKeys`` hints;
    other ``$`` directives are refused (nothing in a Secret needs them)."""
    if isinstance(patch, dict):
        out = {}
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                if key.startswith("$setElementOrder/") or key == "$retainKeys":
                    continue
                raise BadRequest(f"strategic merge patch directive {key!r} is not supported for Secrets")
            out[key] = _without_directives(value)
        return out
    return patch


def _int_param(query: dict, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name}: must be an integer, got {value!r}") from None


class _DryRun(Exception):
    """Raised by a dry-run rollback's guard once it has the plan: stops the store writing."""


class Api:
    def __init__(self, store: ConfigStore, push: PushEngine, *, default_ttl: float = DEFAULT_TTL,
                 metrics=None, metrics_registry=None, security=None):
        self.store = store
        self.push = push
        self.security = security                  # controlplane.security.service.Security (None: open API)
        self._security_handlers = None
        self._stream_owners: dict[str, str] = {}  # node id -> principal that opened its stream
        if security is not None:
            from .security.handlers import SecurityHandlers
            self._security_handlers = SecurityHandlers(security)
        self.default_ttl = default_ttl
        self.metrics = metrics                    # ControlPlaneMetrics or None
        self.metrics_registry = metrics_registry  # the CollectorRegistry /metrics renders

    async def handle(self, request: Request):
        response = await self._route(request)
        if self.metrics and request.path.startswith("/apis/"):
            parts = request.path.rstrip("/").split("/")
            plural = parts[-1] if request.method in ("GET", "POST") else parts[-2]
            kind = BY_PLURAL[plural].kind if plural in BY_PLURAL else "-"
            self.metrics.api_request(request.method, kind, response.status)
            if response.status == 422:
                self.metrics.rejected(kind)
        return response

    async def _route(self, request: Request):
        allowed = []
        routes = ROUTES
        if self.security is not None:
            routes = ROUTES + SECURITY_ROUTES
        for method, pattern, name in routes:
            match = pattern.match(request.path)
            if match:
                if method == request.method:
                    try:
                        if self.security is not None:
                            request.principal = await self.security.authenticate(request)
                            self.security.authorize(request.principal, name, request.method, request.path)
                        handler = getattr(self, "_" + name, None) or getattr(self._security_handlers, name)
                        return await handler(request, **match.groupdict())
                    except kube.ApplyConflict as exc:
                        return status(409, "Conflict", str(exc), details={"causes": exc.causes})
                    except (StoreError, Denied) as exc:
                        return status(exc.code, exc.reason, str(exc))
                allowed.append(method)
        if allowed:
            return status(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path} "
                                                   f"(allowed: {', '.join(allowed)})")
        return status(404, "NotFound", f"the server could not find the requested resource ({request.path})")

    def _who(self, request: Request) -> str:
        """The author recorded in the history: the authenticated principal, or (open API) the
        x-meshctl-user header."""
        principal = request.principal
        if principal is not None:
            return principal.name
        return request.headers.get("x-meshctl-user", "api")

    def _check_own(self, request: Request, namespace: str, what: str) -> None:
        if self.security is not None and request.principal is not None:
            self.security.check_own(request.principal, namespace, what)

    def _owned_workload(self, request: Request, wid: str) -> None:
        """A sidecar may heartbeat/deregister only workloads registered under its own identity."""
        principal = request.principal
        if self.security is None or principal is None or principal.identity is None or principal.scope:
            return
        workload = self.store.workloads().get(wid)
        if workload is not None and workload.get("identity") != principal.identity.uri:
            raise Denied(403, "Forbidden", f"{principal.name} may not change workload {wid} "
                                           f"(registered by {workload.get('identity') or 'another client'})")

    # ------------------------------------------------------------ discovery

    async def _healthz(self, request):
        return Response(200, b"ok\n", "text/plain")

    async def _metrics(self, request):
        if self.metrics_registry is None:
            raise NotFound("metrics are not enabled")
        from prometheus_client import CONTENT_TYPE_LATEST
        from .metrics import exposition
        return Response(200, exposition(self.metrics_registry), CONTENT_TYPE_LATEST)

    async def _version(self, request):
        return Response.json(200, kube.SERVER_VERSION)

    async def _core_versions(self, request):
        return Response.json(200, kube.api_versions())

    async def _core_resources(self, request):
        return Response.json(200, kube.core_resources())

    def _namespace_names(self) -> list[str]:
        names = {ns for (_, ns, _) in self.store.resources()} | {w["namespace"] for w in self.store.workloads().values()}
        return sorted(names | {"default"})

    async def _namespaces(self, request):
        return Response.json(200, {"apiVersion": "v1", "kind": "NamespaceList",
                                   "metadata": {"resourceVersion": str(self._revision())},
                                   "items": [kube.namespace_object(n) for n in self._namespace_names()]})

    async def _namespace(self, request, name):
        if name not in self._namespace_names():
            raise NotFound(f'namespaces "{name}" not found')
        return Response.json(200, kube.namespace_object(name))

    async def _groups(self, request):
        return Response.json(200, kube.api_group_list())

    async def _group(self, request, group):
        body = kube.api_group(group)
        if body is None:
            raise NotFound(f"the server could not find the requested resource (group {group})")
        return Response.json(200, body)

    async def _resource_list(self, request, group, version):
        body = kube.api_resource_list(group, version)
        if body is None:
            raise NotFound(f"the server could not find the requested resource ({group}/{version})")
        return Response.json(200, body)

    async def _openapi_paths(self, request):
        from .openapi import v3_paths
        return Response.json(200, v3_paths())

    async def _openapi_core(self, request, version):
        from .openapi import v3_core_document
        return Response.json(200, v3_core_document(version))

    async def _openapi_group_version(self, request, group, version):
        from .openapi import v3_document
        body = v3_document(group, version)
        if body is None:
            raise NotFound(f"no OpenAPI document for {group}/{version}")
        return Response.json(200, body)

    # ------------------------------------------------------------ core v1 (Secrets)

    async def _core_list_all(self, request, version, plural):
        return await self._list(request, CORE_GROUP, version, None, plural)

    async def _core_list(self, request, version, ns, plural):
        return await self._list(request, CORE_GROUP, version, ns, plural)

    async def _core_create(self, request, version, ns, plural):
        return await self._create(request, CORE_GROUP, version, ns, plural)

    async def _core_get(self, request, version, ns, plural, name):
        return await self._get(request, CORE_GROUP, version, ns, plural, name)

    async def _core_replace(self, request, version, ns, plural, name):
        return await self._replace(request, CORE_GROUP, version, ns, plural, name)

    async def _core_patch(self, request, version, ns, plural, name):
        return await self._patch(request, CORE_GROUP, version, ns, plural, name)

    async def _core_delete(self, request, version, ns, plural, name):
        return await self._delete(request, CORE_GROUP, version, ns, plural, name)

    # ------------------------------------------------------------ resources

    @staticmethod
    def _kind(group: str, version: str, plural: str) -> Kind:
        kind = kind_for(group, version, plural)
        if kind is None:
            raise NotFound(f"the server could not find the requested resource ({group}/{version} {plural})")
        return kind

    def _items(self, kind: Kind, namespace: str | None, query: dict | None = None) -> list[dict]:
        labels = kube.parse_label_selector((query or {}).get("labelSelector", ""))
        fields = kube.parse_field_selector((query or {}).get("fieldSelector", ""))
        items = [obj for (k, ns, _), obj in self.store.resources().items()
                 if k == kind.kind and (namespace is None or ns == namespace) and kube.selected(obj, labels, fields)]
        return sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))

    def _revision(self) -> int:
        return self.store.resource_revision()

    async def _list_all(self, request, group, version, plural):
        return await self._list(request, group, version, None, plural)

    async def _list(self, request, group, version, ns, plural):
        kind = self._kind(group, version, plural)
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, kind, ns)
        items, meta = kube.page(self._items(kind, ns, request.query), _int_param(request.query, "limit"),
                                request.query.get("continue"), str(self._revision()))
        if kube.wants_table(request.headers.get("accept", "")):
            return Response.json(200, self._table(kind, items, meta, request.query.get("includeObject", "Metadata")))
        return Response.json(200, {"apiVersion": kind.group_version(version), "kind": f"{kind.kind}List",
                                   "metadata": meta, "items": [redacted(o) for o in items]})

    @staticmethod
    def _table(kind: Kind, items: list[dict], meta: dict, include: str) -> dict:
        """kubectl's Table: cells from the stored objects (a Secret's DATA counts its keys), the
        objects in the rows as anyone may read them."""
        body = kube.table(kind, items, meta, include)
        for row in body["rows"]:
            if is_secret(row.get("object")):
                row["object"] = redacted(row["object"])
        return body

    async def _get(self, request, group, version, ns, plural, name):
        kind = self._kind(group, version, plural)
        obj = self._existing(kind, ns, name)
        if kube.wants_table(request.headers.get("accept", "")):
            meta = {"resourceVersion": obj["metadata"]["resourceVersion"]}
            return Response.json(200, self._table(kind, [obj], meta, request.query.get("includeObject", "Metadata")))
        return Response.json(200, redacted(obj))

    def _existing(self, kind: Kind, ns: str, name: str) -> dict:
        obj = self.store.resources().get((kind.kind, ns, name))
        if obj is None:
            raise NotFound(f'{kind.plural}.{kind.group} "{name}" not found')
        return obj

    async def _create(self, request, group, version, ns, plural):
        kind = self._kind(group, version, plural)
        return await self._write(request, kind, ns, None, parse_body(request), create_only=True)

    async def _replace(self, request, group, version, ns, plural, name):
        kind = self._kind(group, version, plural)
        return await self._write(request, kind, ns, name, parse_body(request), create_only=False)

    async def _patch(self, request, group, version, ns, plural, name):
        """PATCH as Kubernetes serves custom resources: merge patch, JSON patch, server-side apply."""
        kind = self._kind(group, version, plural)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        existing = self.store.resources().get((kind.kind, ns, name))
        body = parse_body(request)
        if content_type == "application/apply-patch+yaml":
            if not request.query.get("fieldManager"):
                raise BadRequest("fieldManager: required for apply patches")
            if not isinstance(body, dict):
                raise BadRequest("an apply patch must be one object (a mapping)")
            errors = [f"{p}: must be {want!r} for this URL, got {body.get(p)!r}"
                      for p, want in (("kind", kind.kind),) if body.get(p) not in (None, want)]
            if errors:
                return invalid(kind.kind, ns, name, errors, kind.group)
            applied = kube.apply(existing, body, request.query["fieldManager"], request.query.get("force") == "true")
            expect = (body.get("metadata") or {}).get("resourceVersion")
            return await self._commit(request, kind, ns, name, applied, existing, expect, managed=True)
        if existing is None:
            raise NotFound(f'{kind.plural}.{kind.group} "{name}" not found')
        if content_type == "application/merge-patch+json":
            if not isinstance(body, dict):
                raise BadRequest("a merge patch must be an object")
            patched = kube.merge_patch(existing, body)
            expect = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body.get("metadata"), dict) else None
        elif content_type == "application/strategic-merge-patch+json" and kind.group == CORE_GROUP:
            # kubectl's client-side apply of a built-in kind: a Secret has no list merged by key,
            # so its strategic merge patch is a merge patch once kubectl's ordering hints are gone
            if not isinstance(body, dict):
                raise BadRequest("a strategic merge patch must be an object")
            patched = kube.merge_patch(existing, _without_directives(body))
            expect = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body.get("metadata"), dict) else None
        elif content_type == "application/json-patch+json":
            patched = kube.json_patch(existing, body)
            moved = (patched.get("metadata") or {}).get("resourceVersion")
            expect = moved if moved != existing["metadata"]["resourceVersion"] else None
        else:
            raise kube.UnsupportedMediaType(
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml "
                f"(got {content_type or 'none'}; strategic merge patch is not supported for custom resources)")
        return await self._commit(request, kind, ns, name, patched, existing, expect)

    async def _write(self, request, kind: Kind, ns: str, name: str | None, body, create_only: bool):
        if not isinstance(body, dict):
            raise BadRequest("request body must be one object (a mapping)")
        md = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        obj_name = md.get("name") or name or "?"
        existing = self.store.resources().get((kind.kind, ns, obj_name))
        return await self._commit(request, kind, ns, name, body, existing, md.get("resourceVersion"),
                                  create_only=create_only)

    async def _commit(self, request, kind: Kind, ns: str, name: str | None, body: dict, existing: dict | None,
                      expect, *, create_only: bool = False, managed: bool = False):
        """Validate, then store (or with dryRun=All only answer) one object; the writer's field
        ownership is recorded in metadata.managedFields."""
        if kind.kind == "Secret":
            body = _secret_body(body, existing)
        errors = validate_object(body, kind.kind, ns, name)
        md = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        if not errors and kind.kind == "Secret" and existing is not None and existing.get("immutable") and \
                content_of(existing) != content_of(body):
            errors = [f"Secret {ns}/{md.get('name') or name}: data: field is immutable when `immutable` is set"]
        if errors:
            return invalid(kind.kind, ns, name or md.get("name") or "?", errors, kind.group)
        obj = {"apiVersion": body.get("apiVersion") or kind.api_version, "kind": kind.kind,
               "metadata": {k: md[k] for k in ("name", "labels", "annotations") if k in md} | {"namespace": ns},
               **content_of(body)}
        obj["metadata"]["managedFields"] = (md.get("managedFields") if managed else
                                            kube.record_update(existing, obj, kube.manager_from(request.query, request.headers)))
        headers = [("warning", f'299 - "{w}"'.encode("ascii", "replace").decode()) for w in await self._warnings(obj)]
        if request.query.get("dryRun") == "All":
            preview = dict(obj, metadata=dict(obj["metadata"], **{k: v for k, v in (existing or {}).get("metadata", {}).items()
                                                                  if k in ("resourceVersion", "generation", "creationTimestamp")}))
            return Response(200 if existing else 201, Response.json(200, redacted(preview)).body, headers=headers)
        stored = await self.store.put(obj, expect_version=str(expect) if expect else None,
                                      create_only=create_only, origin=self._who(request))
        return Response(200 if existing else 201, Response.json(200, redacted(stored)).body, headers=headers)

    async def _warnings(self, obj: dict) -> list[str]:
        """Kubernetes-style Warning headers: what proxies would report about this object.
        A compile of the mesh: done off the event loop, and skipped for large meshes."""
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        resources, workloads = self.store.resources(), self.store.workloads()
        own = decode_warnings(proxy_view(obj))      # fields accepted but not applied: always reported
        if len(resources) + len(workloads) > WARNINGS_MAX_OBJECTS:
            return own
        others = [proxy_view(o) for k, o in sorted(resources.items()) if k != key and k[0] in BY_KIND]
        compiled = await asyncio.to_thread(apply_warnings, proxy_view(obj), others, list(workloads.values()))
        return own + [w for w in compiled if w not in own]

    async def _delete(self, request, group, version, ns, plural, name):
        kind = self._kind(group, version, plural)
        expect = request.query.get("resourceVersion")
        if request.body:
            options = parse_body(request) or {}
            pre = options.get("preconditions") or {} if isinstance(options, dict) else {}
            expect = pre.get("resourceVersion", expect)
            if options.get("dryRun") == ["All"]:
                request.query["dryRun"] = "All"
        if request.query.get("dryRun") == "All":
            return Response.json(200, redacted(self._existing(kind, ns, name)))
        gone = await self.store.delete((kind.kind, ns, name), expect_version=expect, origin=self._who(request))
        return Response.json(200, redacted(gone))

    # ------------------------------------------------------------ watch

    async def _watch(self, request, kind: Kind, ns: str | None) -> StreamResponse:
        """Kubernetes watch: one JSON event per line.  Without resourceVersion (or "0"), ADDED for
        what exists, then ADDED/MODIFIED/DELETED as it changes; with one, the changes after it
        (410 Expired when the history no longer reaches back that far).  An object that stops
        matching the selectors is DELETED for this watch; BOOKMARKs only with allowWatchBookmarks
        (an object with just metadata.resourceVersion); the stream ends after timeoutSeconds."""
        query = dict(request.query)
        self._items(kind, ns, query)                         # a bad selector is a 400 before the stream starts
        timeout = _int_param(query, "timeoutSeconds")
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        as_table = kube.wants_table(request.headers.get("accept", ""))
        include = query.get("includeObject", "Metadata")
        replayed, seen = await self._replay(kind, ns, query, query.get("resourceVersion", ""))
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)

        def on_change(what):
            if what == CHANGED_RESOURCES and queue.empty():
                queue.put_nowait(what)

        def event(type_: str, obj: dict) -> bytes:
            if as_table and type_ != "BOOKMARK":
                obj = self._table(kind, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}, include)
            else:
                obj = redacted(obj)
            return (json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n").encode()

        self.store.subscribe(on_change)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None

        async def events():
            nonlocal seen
            try:
                for type_, obj in replayed:
                    yield event(type_, obj)
                while True:
                    current = {(o["metadata"]["namespace"], o["metadata"]["name"]): o
                               for o in self._items(kind, ns, query)}
                    out = []
                    for key, obj in current.items():
                        old = seen.get(key)
                        if old is None or old["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                            out.append(("ADDED" if old is None else "MODIFIED", obj))
                    revision = str(self._revision())
                    for key in seen.keys() - current.keys():
                        gone = seen[key]
                        out.append(("DELETED", dict(gone, metadata=dict(gone["metadata"], resourceVersion=revision))))
                    for type_, obj in sorted(out, key=lambda e: int(e[1]["metadata"]["resourceVersion"])):
                        yield event(type_, obj)
                    seen = current
                    wait = self.push.ping_interval
                    if deadline is not None:
                        wait = min(wait, deadline - loop.time())
                        if wait <= 0:
                            return
                    try:
                        async with asyncio.timeout(wait):
                            await queue.get()
                    except asyncio.TimeoutError:
                        if bookmarks:
                            yield event("BOOKMARK", {"kind": kind.kind, "apiVersion": kind.api_version,
                                                     "metadata": {"resourceVersion": str(self._revision())}})
            finally:
                self.store.unsubscribe(on_change)

        return StreamResponse(events(), content_type="application/json")

    async def _replay(self, kind: Kind, ns: str | None, query: dict, resource_version: str) -> tuple[list, dict]:
        """Where a watch starts: (events to send first, the objects the client then knows).
        No resourceVersion (or "0"): nothing replayed, so everything current is ADDED.  With one,
        each change after it, from the history, in order, with its own resourceVersion."""
        if resource_version in ("", "0"):
            return [], {}
        try:
            since = int(resource_version)
        except ValueError:
            raise BadRequest(f"resourceVersion: must be an integer, got {resource_version!r}") from None
        key_of = lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])
        current = self._revision()
        if since >= current:
            return [], {key_of(o): o for o in self._items(kind, ns, query)}
        entries = await self.store.history(WATCH_HISTORY)        # newest first
        newer = [e for e in entries if e.revision > since]
        if not entries or (len(newer) == len(entries) and entries[-1].revision > since + 1):
            raise kube.Gone(f"too old resource version: {since} ({current})")
        labels = kube.parse_label_selector(query.get("labelSelector", ""))
        fields = kube.parse_field_selector(query.get("fieldSelector", ""))
        visible = lambda o: o is not None and kube.selected(o, labels, fields)
        relevant = [e for e in reversed(newer) if e.kind == kind.kind and (ns is None or e.namespace == ns)]
        seen = {key_of(o): o for o in self._items(kind, ns, query) if int(o["metadata"]["resourceVersion"]) <= since}
        decided = set(seen)
        for e in relevant:                         # the state at `since`: each key's first change's "before"
            key = (e.namespace, e.name)
            if key not in decided:
                decided.add(key)
                if visible(e.before):
                    seen[key] = e.before
        events = []
        known = dict(seen)
        for e in relevant:
            key = (e.namespace, e.name)
            after = None
            if e.after is not None:
                after = dict(e.after, metadata=dict(e.after["metadata"], resourceVersion=str(e.revision)))
            was, now = key in known, visible(after)
            if now:
                events.append(("MODIFIED" if was else "ADDED", after))
                known[key] = after
            elif was:
                last = known.pop(key)
                events.append(("DELETED", dict(last, metadata=dict(last["metadata"], resourceVersion=str(e.revision)))))
        return events, known

    # ------------------------------------------------------------ history

    async def _history(self, request):
        limit = int(request.query.get("limit", "100"))
        entries = await self.store.history(limit)
        return Response.json(200, {"items": [e.to_dict() for e in entries]})

    async def _rollback(self, request, revision):
        """Make the resources what they were at ``revision``, as one new revision.  A rollback
        that would create, change or delete a security.istio.io policy (PeerAuthentication,
        AuthorizationPolicy) is refused naming each one unless the caller asks for it with
        ``includeSecurity=true`` (and, with authentication on, has scope admin): undoing a bad
        traffic shift must never quietly turn mTLS STRICT off or drop a DENY.  ``dryRun=All``
        answers the plan without writing."""
        revision = int(revision)
        principal = request.principal if self.security is not None else None
        include_security = request.query.get("includeSecurity", "false") == "true"
        dry_run = request.query.get("dryRun") == "All"
        planned: list[dict] = []

        def guard(changes: list[dict]) -> None:
            named = lambda c: f"{c['op']} {c['kind']} {c['namespace']}/{c['name']}"
            secrets = sorted({f"{c['namespace']}/{c['name']}" for c in changes if c["kind"] == "Secret"})
            policies = [named(c) for c in changes
                        if c["kind"] in BY_KIND and BY_KIND[c["kind"]].group == SECURITY_GROUP]
            not_admin = principal is not None and not principal.has("admin")
            if not_admin and secrets:       # Secrets are written by admins only
                raise Denied(403, "Forbidden", f"{principal.name} may not roll back to revision {revision}: it would "
                                               f"change Secret(s) {', '.join(secrets)} (needs scope admin)")
            if policies and not_admin:
                raise Denied(403, "Forbidden", f"{principal.name} may not roll back to revision {revision}: it would "
                                               f"change security policies ({'; '.join(policies)}) (needs scope admin)")
            if policies and not include_security:
                raise Denied(409, "Conflict", f"rollback to revision {revision} would change security policies "
                                              f"({'; '.join(policies)}); nothing was changed: to restore them too, "
                                              f"ask with includeSecurity=true (meshctl rollback --include-security)")
            planned.extend(changes)
            if dry_run:
                raise _DryRun()

        who = self._who(request)
        by = f" by {who}" if self.security is not None else ""
        try:
            new_revision = await self.store.rollback(revision, origin=f"rollback to {revision}{by}", guard=guard)
        except _DryRun:
            new_revision = self.store.resource_revision()
        return Response.json(200, {"revision": new_revision, "rolled_back_to": revision, "changes": planned,
                                   **({"dryRun": True} if dry_run else {})})

    # ------------------------------------------------------------ registry

    async def _register(self, request):
        body = parse_body(request)
        errors = []
        for field, typ in (("service", str), ("address", str), ("ports", dict)):
            if not isinstance(body.get(field), typ):
                errors.append(f"workload: {field}: required, must be a {typ.__name__}")
        ports = body.get("ports") if isinstance(body.get("ports"), dict) else {}
        for pname, port in ports.items():
            if not isinstance(port, int) or not 0 < port < 65536:
                errors.append(f"workload: ports.{pname}: must be 1..65535, got {port!r}")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            errors.append("workload: labels: must be a mapping of strings")
        ttl = body.get("ttl", self.default_ttl)
        if not isinstance(ttl, (int, float)) or ttl <= 0:
            errors.append(f"workload: ttl: must be > 0 seconds, got {ttl!r}")
        proxy_port = body.get("proxy_port")
        if proxy_port is not None and (not isinstance(proxy_port, int) or not 0 < proxy_port < 65536):
            errors.append(f"workload: proxy_port: must be 1..65535, got {proxy_port!r}")
        service_account = body.get("service_account", "default")
        if not isinstance(service_account, str) or not service_account:
            errors.append(f"workload: service_account: must be a non-empty string, got {service_account!r}")
        unknown = set(body) - {"id", "service", "namespace", "address", "ports", "labels", "ttl", "node_id",
                               "proxy_port", "service_account"}
        errors += [f"workload: {k}: unknown field" for k in sorted(unknown)]
        if errors:
            return status(422, "Invalid", "; ".join(errors),
                          details={"causes": [{"message": e, "field": e.split(": ")[1]} for e in errors]})
        workload = {"id": str(body.get("id") or uuid.uuid4().hex), "service": body["service"],
                    "namespace": body.get("namespace") or "default", "address": body["address"],
                    "ports": ports, "labels": labels, "node_id": body.get("node_id", "")}
        if proxy_port is not None:
            workload["proxy_port"] = proxy_port
        if self.security is not None:
            # "identity" = this workload has a sidecar with a workload certificate (auto mTLS goes
            # to it, and the service runs as it): the verified certificate's, or (a token, or
            # --insecure-loopback) the service account the registration names
            self._check_own(request, workload["namespace"], "register workloads")
            principal = request.principal
            has_identity = "service_account" in body
            if principal.identity is not None and not principal.scope:
                if service_account != principal.identity.service_account and "service_account" in body:
                    raise Denied(403, "Forbidden", f"{principal.name} may not register a workload of service "
                                                   f"account {service_account}")
                service_account, has_identity = principal.identity.service_account, True
            self._owned_workload(request, workload["id"])
            if has_identity:
                from meshproxy.config.identity import SpiffeId
                try:
                    identity = SpiffeId(self.security.trust_domain, workload["namespace"], service_account).uri
                except ValueError as exc:
                    raise BadRequest(f"workload: {exc}") from None
                workload["service_account"] = service_account
                workload["identity"] = identity
        elif "service_account" in body:
            workload["service_account"] = service_account
        await self.store.register(workload, float(ttl))
        return Response.json(201, dict(workload, ttl=ttl))

    async def _workloads(self, request):
        return Response.json(200, {"items": sorted(self.store.workloads().values(), key=lambda w: w["id"])})

    async def _heartbeat(self, request, wid):
        self._owned_workload(request, wid)
        if not await self.store.heartbeat(wid):
            raise NotFound(f"workload {wid} is not registered (expired?); register again")
        self._note_certificate(wid, request)
        return Response.json(200, {"id": wid})

    def _note_certificate(self, node_id: str, request) -> None:
        """A proxy's request over a newer certificate of the identity it streams as (it renewed;
        its push stream keeps the certificate it connected with): its listing shows the newer
        expiry.  Heartbeats (on a new connection each) and ACKs carry it."""
        principal = request.principal
        proxy = self.push.proxies.get(node_id)
        if proxy is None or principal is None or principal.identity is None or not request.peer_not_after:
            return
        if proxy.info.get("principal") != principal.identity.uri:
            return
        if (expires_at(request.peer_not_after) or 0) > (expires_at(proxy.info.get("cert_not_after", "")) or 0):
            proxy.info["cert_not_after"] = request.peer_not_after

    async def _deregister(self, request, wid):
        self._owned_workload(request, wid)
        if not await self.store.deregister(wid):
            raise NotFound(f"workload {wid} is not registered")
        return Response.json(200, {"id": wid})

    async def _endpoints(self, request, ns, svc):
        items = sorted((w for w in self.store.workloads().values() if w["service"] == svc and w["namespace"] == ns),
                       key=lambda w: w["address"])
        return Response.json(200, {"service": svc, "namespace": ns, "items": items})

    # ------------------------------------------------------------ push

    async def _stream(self, request):
        body = parse_body(request)
        node_id = body.get("node_id")
        if not isinstance(node_id, str) or not node_id:
            raise BadRequest("node_id: required")
        info = body.get("identity") or {}
        if not isinstance(info, dict):
            raise BadRequest("identity: must be a mapping")
        principal = request.principal
        if self.security is not None and principal is not None:
            self._check_own(request, str(info.get("namespace") or "default"), "read the config")
            owner = self._stream_owners.get(node_id)
            if owner is not None and owner != principal.name and not principal.has("admin") \
                    and node_id in self.push.proxies:
                raise Denied(403, "Forbidden", f"node {node_id} is streaming as {owner}; {principal.name} may not "
                                               f"take it over")
            self._stream_owners[node_id] = principal.name
            # the identity shown for the proxy: its verified certificate's over TLS; over
            # --insecure-loopback only what it claims (nothing can be verified there)
            shown = principal.identity.uri if principal.identity else (
                str(info.get("spiffe") or principal.name) if not self.security.tls else principal.name)
            info = dict(info, principal=shown, cert_not_after=request.peer_not_after)
        # where the stream comes from: a proxy's admin address on loopback is only reachable from its own host
        info = dict(info, peer=request.peer.rpartition(":")[0].strip("[]"))
        # Secrets (gateway credentials) only to a verified, granted identity; default deny
        refusal = self.security.secret_refusal(principal, str(info.get("namespace") or "default")) \
            if self.security is not None else "the control plane runs without security and pushes no Secret"
        proxy = self.push.connect(node_id, info,
                                  resources_version=body.get("resources_version") or "",
                                  endpoints_version=body.get("endpoints_version") or "",
                                  secrets_granted=not refusal, secrets_refusal=refusal)
        return StreamResponse(self.push.stream(proxy), on_close=lambda: self.push.disconnect(proxy))

    async def _ack(self, request):
        body = parse_body(request)
        principal = request.principal
        if self.security is not None and principal is not None and not principal.has("edit"):
            owner = self._stream_owners.get(str(body.get("node_id")))
            if owner is not None and owner != principal.name:
                raise Denied(403, "Forbidden", f"{principal.name} may not acknowledge the stream of "
                                               f"{body.get('node_id')} (opened by {owner})")
        if body.get("resync") is True:
            result = self.push.resync(str(body.get("node_id")), str(body.get("nonce")))
            return Response.json(200 if result != "unknown" else 404, {"result": result})
        self._note_certificate(str(body.get("node_id")), request)
        rejected = body.get("rejected") if isinstance(body.get("rejected"), dict) else None
        result = self.push.acknowledge(str(body.get("node_id")), str(body.get("nonce")),
                                       str(body.get("version")), list(body.get("errors") or []),
                                       rejected, body.get("applied") if isinstance(body.get("applied"), bool) else None)
        return Response.json(200 if result != "unknown" else 404, {"result": result})

    async def _proxies(self, request):
        """Every proxy: this replica's, plus (with etcd) those the other replicas published."""
        local = [dict(p.to_dict(), replica="local") for p in self.push.proxies.values()]
        remote = getattr(self.store, "remote_proxies", None)
        others = remote() if remote and request.query.get("local") != "true" else []
        return Response.json(200, {"items": sorted(local + others, key=lambda p: p["node_id"])})
