"""The HTTP API: Kubernetes-style resources, history/rollback, registry, push streams.

Routes (``{ver}`` is v1, v1beta1 or v1alpha3; objects are always stored as given):

  GET    /apis/networking.istio.io/{ver}/{plural}                       list, all namespaces
  GET    /apis/networking.istio.io/{ver}/namespaces/{ns}/{plural}       list (?watch=true streams)
  POST   /apis/networking.istio.io/{ver}/namespaces/{ns}/{plural}       create (409 if it exists)
  GET    /apis/networking.istio.io/{ver}/namespaces/{ns}/{plural}/{n}   get
  PUT    /apis/networking.istio.io/{ver}/namespaces/{ns}/{plural}/{n}   create or update; with
                                                                        metadata.resourceVersion: 409 if stale
  DELETE /apis/networking.istio.io/{ver}/namespaces/{ns}/{plural}/{n}   (?resourceVersion= precondition)
  ?dryRun=All on POST/PUT/DELETE validates and answers without writing.

  GET    /history?limit=N                     accepted changes, newest first
  POST   /history/{revision}/rollback         make the resources what they were at that revision

  POST   /registry/v1/workloads               register {service, namespace, address, ports, labels, id?, ttl?, node_id?, proxy_port?}
  POST   /registry/v1/workloads/{id}/heartbeat
  DELETE /registry/v1/workloads/{id}
  GET    /registry/v1/workloads
  GET    /registry/v1/namespaces/{ns}/services/{svc}/endpoints

  POST   /push/v1/stream   {node_id, identity, resources_version?, endpoints_version?} -> NDJSON stream
  POST   /push/v1/ack      {node_id, nonce, version, errors}
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

from .http import Request, Response, StreamResponse
from .push import PushEngine
from .resources import API_VERSIONS, BY_KIND, BY_PLURAL, DEFAULT_API_VERSION, GROUP, describe, proxy_view
from .store import CHANGED_RESOURCES, BadRequest, ConfigStore, NotFound, StoreError
from .validation import apply_warnings, validate_object

DEFAULT_TTL = 10.0
WARNINGS_MAX_OBJECTS = 3000     # above this many resources + workloads, writes skip the warning compile
_VER = "|".join(API_VERSIONS)
_PLURAL = "|".join(BY_PLURAL)
ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p), h) for m, p, h in [
        ("GET", r"^/healthz$", "healthz"),
        ("GET", r"^/metrics$", "metrics"),
        ("GET", rf"^/apis/{GROUP}/(?:{_VER})/(?P<plural>{_PLURAL})$", "list_all"),
        ("GET", rf"^/apis/{GROUP}/(?:{_VER})/namespaces/(?P<ns>[^/]+)/(?P<plural>{_PLURAL})$", "list"),
        ("POST", rf"^/apis/{GROUP}/(?:{_VER})/namespaces/(?P<ns>[^/]+)/(?P<plural>{_PLURAL})$", "create"),
        ("GET", rf"^/apis/{GROUP}/(?:{_VER})/namespaces/(?P<ns>[^/]+)/(?P<plural>{_PLURAL})/(?P<name>[^/]+)$", "get"),
        ("PUT", rf"^/apis/{GROUP}/(?:{_VER})/namespaces/(?P<ns>[^/]+)/(?P<plural>{_PLURAL})/(?P<name>[^/]+)$", "replace"),
        ("DELETE", rf"^/apis/{GROUP}/(?:{_VER})/namespaces/(?P<ns>[^/]+)/(?P<plural>{_PLURAL})/(?P<name>[^/]+)$", "delete"),
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


def invalid(kind: str, namespace: str, name: str, errors: list[str]) -> Response:
    causes = []
    prefix = f"{describe(kind, namespace, name)}: "
    for error in errors:
        rest = error[len(prefix):] if error.startswith(prefix) else error
        field, sep, message = rest.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "field": field if sep else "", "message": error})
    return status(422, "Invalid", f"{describe(kind, namespace, name)} is invalid: " + "; ".join(errors),
                  details={"name": name, "group": GROUP, "kind": kind, "causes": causes})


def parse_body(request: Request):
    text = request.body.decode("utf-8", "replace").strip()
    if not text:
        raise BadRequest("request body is empty")
    try:
        return json.loads(text) if text[:1] in "{[" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise BadRequest(f"request body is neither valid JSON nor YAML: {exc}") from None


class Api:
    def __init__(self, store: ConfigStore, push: PushEngine, *, default_ttl: float = DEFAULT_TTL,
                 metrics=None, metrics_registry=None):
        self.store = store
        self.push = push
        self.default_ttl = default_ttl
        self.metrics = metrics                    # ControlPlaneMetrics or None
        self.metrics_registry = metrics_registry  # the CollectorRegistry /metrics renders

    async def handle(self, request: Request):
        response = await self._route(request)
        if self.metrics and request.path.startswith("/apis/"):
            plural = request.path.split("/")[-1] if request.method in ("GET", "POST") else request.path.split("/")[-2]
            kind = BY_PLURAL[plural].kind if plural in BY_PLURAL else "-"
            self.metrics.api_request(request.method, kind, response.status)
            if response.status == 422:
                self.metrics.rejected(kind)
        return response

    async def _route(self, request: Request):
        allowed = []
        for method, pattern, name in ROUTES:
            match = pattern.match(request.path)
            if match:
                if method == request.method:
                    try:
                        return await getattr(self, "_" + name)(request, **match.groupdict())
                    except StoreError as exc:
                        return status(exc.code, exc.reason, str(exc))
                allowed.append(method)
        if allowed:
            return status(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path} "
                                                   f"(allowed: {', '.join(allowed)})")
        return status(404, "NotFound", f"no route for {request.method} {request.path}")

    # ------------------------------------------------------------ resources

    async def _healthz(self, request):
        return Response(200, b"ok\n", "text/plain")

    async def _metrics(self, request):
        if self.metrics_registry is None:
            raise NotFound("metrics are not enabled")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(200, generate_latest(self.metrics_registry), CONTENT_TYPE_LATEST)

    def _items(self, kind: str, namespace: str | None) -> list[dict]:
        items = [obj for (k, ns, _), obj in self.store.resources().items()
                 if k == kind and (namespace is None or ns == namespace)]
        return sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))

    def _list_body(self, kind: str, items: list[dict]) -> dict:
        revisions = [int(o["metadata"]["resourceVersion"]) for o in self.store.resources().values()]
        return {"apiVersion": DEFAULT_API_VERSION, "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(max(revisions, default=0))}, "items": items}

    async def _list_all(self, request, plural):
        kind = BY_PLURAL[plural].kind
        return Response.json(200, self._list_body(kind, self._items(kind, None)))

    async def _list(self, request, ns, plural):
        kind = BY_PLURAL[plural].kind
        if request.query.get("watch") in ("true", "1"):
            return self._watch(kind, ns)
        return Response.json(200, self._list_body(kind, self._items(kind, ns)))

    async def _get(self, request, ns, plural, name):
        kind = BY_PLURAL[plural].kind
        obj = self.store.resources().get((kind, ns, name))
        if obj is None:
            raise NotFound(f"{describe(kind, ns, name)} not found")
        return Response.json(200, obj)

    async def _write(self, request, ns, plural, name, create_only):
        kind = BY_PLURAL[plural].kind
        body = parse_body(request)
        if not isinstance(body, dict):
            raise BadRequest("request body must be one object (a mapping)")
        errors = validate_object(body, kind, ns, name)
        obj_name = (body.get("metadata") or {}).get("name") if isinstance(body.get("metadata"), dict) else None
        if errors:
            return invalid(kind, ns, name or obj_name or "?", errors)
        md = body["metadata"]
        expect = md.get("resourceVersion")
        obj = {"apiVersion": body.get("apiVersion") or DEFAULT_API_VERSION, "kind": kind,
               "metadata": {k: md[k] for k in ("name", "labels", "annotations") if k in md} | {"namespace": ns},
               "spec": body["spec"]}
        headers = [("warning", f'299 - "{w}"'.encode("ascii", "replace").decode()) for w in await self._warnings(obj)]
        if request.query.get("dryRun") == "All":
            return Response(200, Response.json(200, obj).body, headers=headers)
        existed = (kind, ns, obj["metadata"]["name"]) in self.store.resources()
        stored = await self.store.put(obj, expect_version=str(expect) if expect else None,
                                      create_only=create_only, origin=request.headers.get("x-meshctl-user", "api"))
        return Response(200 if existed else 201, Response.json(200, stored).body, headers=headers)

    async def _warnings(self, obj: dict) -> list[str]:
        """Kubernetes-style Warning headers: what proxies would report about this object.
        A compile of the mesh: done off the event loop, and skipped for large meshes."""
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        resources, workloads = self.store.resources(), self.store.workloads()
        if len(resources) + len(workloads) > WARNINGS_MAX_OBJECTS:
            return []
        others = [proxy_view(o) for k, o in sorted(resources.items()) if k != key and k[0] in BY_KIND]
        return await asyncio.to_thread(apply_warnings, proxy_view(obj), others, list(workloads.values()))

    async def _create(self, request, ns, plural):
        return await self._write(request, ns, plural, None, True)

    async def _replace(self, request, ns, plural, name):
        return await self._write(request, ns, plural, name, False)

    async def _delete(self, request, ns, plural, name):
        kind = BY_PLURAL[plural].kind
        expect = request.query.get("resourceVersion")
        if request.body:
            pre = (parse_body(request) or {}).get("preconditions") or {}
            expect = pre.get("resourceVersion", expect)
        if request.query.get("dryRun") == "All":
            obj = self.store.resources().get((kind, ns, name))
            if obj is None:
                raise NotFound(f"{describe(kind, ns, name)} not found")
            return Response.json(200, obj)
        gone = await self.store.delete((kind, ns, name), expect_version=expect,
                                       origin=request.headers.get("x-meshctl-user", "api"))
        return Response.json(200, gone)

    def _watch(self, kind: str, ns: str) -> StreamResponse:
        """Kubernetes watch: ADDED for what exists, then ADDED/MODIFIED/DELETED as it changes."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)

        def on_change(what):
            if what == CHANGED_RESOURCES and queue.empty():
                queue.put_nowait(what)

        self.store.subscribe(on_change)

        async def events():
            seen: dict[str, dict] = {}
            try:
                while True:
                    current = {o["metadata"]["name"]: o for o in self._items(kind, ns)}
                    for name, obj in current.items():
                        old = seen.get(name)
                        if old is None or old["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                            kind_of = "ADDED" if old is None else "MODIFIED"
                            yield (json.dumps({"type": kind_of, "object": obj}) + "\n").encode()
                    for name in seen.keys() - current.keys():
                        yield (json.dumps({"type": "DELETED", "object": seen[name]}) + "\n").encode()
                    seen = current
                    try:
                        async with asyncio.timeout(self.push.ping_interval):
                            await queue.get()
                    except asyncio.TimeoutError:
                        yield b'{"type":"BOOKMARK"}\n'
            finally:
                self.store.unsubscribe(on_change)

        return StreamResponse(events())

    # ------------------------------------------------------------ history

    async def _history(self, request):
        limit = int(request.query.get("limit", "100"))
        entries = await self.store.history(limit)
        return Response.json(200, {"items": [e.to_dict() for e in entries]})

    async def _rollback(self, request, revision):
        new_revision = await self.store.rollback(int(revision), origin=f"rollback to {revision}")
        return Response.json(200, {"revision": new_revision, "rolled_back_to": int(revision)})

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
        unknown = set(body) - {"id", "service", "namespace", "address", "ports", "labels", "ttl", "node_id",
                               "proxy_port"}
        errors += [f"workload: {k}: unknown field" for k in sorted(unknown)]
        if errors:
            return status(422, "Invalid", "; ".join(errors),
                          details={"causes": [{"message": e, "field": e.split(": ")[1]} for e in errors]})
        workload = {"id": str(body.get("id") or uuid.uuid4().hex), "service": body["service"],
                    "namespace": body.get("namespace") or "default", "address": body["address"],
                    "ports": ports, "labels": labels, "node_id": body.get("node_id", "")}
        if proxy_port is not None:
            workload["proxy_port"] = proxy_port
        await self.store.register(workload, float(ttl))
        return Response.json(201, dict(workload, ttl=ttl))

    async def _workloads(self, request):
        return Response.json(200, {"items": sorted(self.store.workloads().values(), key=lambda w: w["id"])})

    async def _heartbeat(self, request, wid):
        if not await self.store.heartbeat(wid):
            raise NotFound(f"workload {wid} is not registered (expired?); register again")
        return Response.json(200, {"id": wid})

    async def _deregister(self, request, wid):
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
        proxy = self.push.connect(node_id, body.get("identity") or {},
                                  resources_version=body.get("resources_version") or "",
                                  endpoints_version=body.get("endpoints_version") or "")
        return StreamResponse(self.push.stream(proxy), on_close=lambda: self.push.disconnect(proxy))

    async def _ack(self, request):
        body = parse_body(request)
        result = self.push.acknowledge(str(body.get("node_id")), str(body.get("nonce")),
                                       str(body.get("version")), list(body.get("errors") or []))
        return Response.json(200 if result != "unknown" else 404, {"result": result})

    async def _proxies(self, request):
        """Every proxy: this replica's, plus (with etcd) those the other replicas published."""
        local = [dict(p.to_dict(), replica="local") for p in self.push.proxies.values()]
        remote = getattr(self.store, "remote_proxies", None)
        others = remote() if remote and request.query.get("local") != "true" else []
        return Response.json(200, {"items": sorted(local + others, key=lambda p: p["node_id"])})
