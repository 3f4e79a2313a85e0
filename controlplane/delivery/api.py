"""The delivery API, served by the control plane next to the networking kinds:

  GET    /apis/delivery.meshproxy.io/v1/canaries                              list, all namespaces
  GET    /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries              list
  POST   /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries              create (409 if it exists)
  GET    /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries/{name}       the object + status
  PUT    /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries/{name}       create or update
  DELETE /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries/{name}
  POST   /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries/{name}/{promote|abort|pause|resume}
  GET    /apis/delivery.meshproxy.io/v1/namespaces/{ns}/canaries/{name}/events
  GET    /delivery/v1/leader       this replica, the replica driving canaries, whether it is this one
  GET    /delivery/v1/traffic      live requests/s, success rate, p50/p99 per service and version
  GET    /ui                       the web console (see console.py)
  ?dryRun=All on writes validates and answers without writing.

A Canary is validated like the networking kinds (every error with its path, 422 Invalid with
causes; warnings as ``Warning`` headers) and also against the store: its VirtualService and
route, and a DestinationRule with both subsets.  The object is stored in the resource store
(so it is in the history); its status lives beside it (:mod:`.state`).
"""
from __future__ import annotations

import re

from ..api import invalid, parse_body, status as status_response
from ..http import Request, Response
from ..store import BadRequest, NotFound, StoreError
from ..validation import DNS1123_LABEL, DNS1123_SUBDOMAIN
from .console import TrafficView, asset as console_asset
from .controller import ACTIONS, DeliveryController
from .spec import API_VERSION, GROUP, KIND, PLURAL, check_references, decode_canary

_BASE = rf"^/apis/{re.escape(GROUP)}/v1"
ROUTES = [(m, re.compile(p), h) for m, p, h in [
    ("GET", _BASE + rf"/{PLURAL}$", "list_all"),
    ("GET", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}$", "list"),
    ("POST", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}$", "create"),
    ("GET", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}/(?P<name>[^/]+)$", "get"),
    ("PUT", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}/(?P<name>[^/]+)$", "replace"),
    ("DELETE", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}/(?P<name>[^/]+)$", "delete"),
    ("GET", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}/(?P<name>[^/]+)/events$", "events"),
    ("POST", _BASE + rf"/namespaces/(?P<ns>[^/]+)/{PLURAL}/(?P<name>[^/]+)/(?P<action>{'|'.join(ACTIONS)})$",
     "action"),
    ("GET", r"^/delivery/v1/traffic$", "traffic"),
    ("GET", r"^/delivery/v1/leader$", "leader"),
    ("GET", r"^/ui/?$", "ui"),
    ("GET", r"^/ui/(?P<asset>[a-z0-9_.-]+)$", "ui"),
]]


def check_metadata(obj: dict, namespace: str, name: str | None) -> list[str]:
    errors = []
    md = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else None
    where = f"{KIND} {namespace}/{(md or {}).get('name') or name or '?'}"
    if obj.get("apiVersion") not in (None, API_VERSION):
        errors.append(f"{where}: apiVersion: must be {API_VERSION}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") not in (None, KIND):
        errors.append(f"{where}: kind: must be {KIND} for this URL, got {obj.get('kind')!r}")
    if md is None:
        return errors + [f"{where}: metadata: must be a mapping"]
    unknown = set(md) - {"name", "namespace", "labels", "annotations", "resourceVersion", "generation",
                         "creationTimestamp", "uid"}
    errors += [f"{where}: metadata.{k}: unknown field" for k in sorted(unknown)]
    obj_name = md.get("name")
    if not isinstance(obj_name, str) or not DNS1123_SUBDOMAIN.match(obj_name):
        errors.append(f"{where}: metadata.name: required, a lower-case DNS-1123 subdomain, got {obj_name!r}")
    elif name is not None and obj_name != name:
        errors.append(f"{where}: metadata.name: does not match the name in the URL ({name!r})")
    if md.get("namespace") not in (None, namespace):
        errors.append(f"{where}: metadata.namespace: does not match the namespace in the URL ({namespace!r})")
    elif not DNS1123_LABEL.match(namespace):
        errors.append(f"{where}: metadata.namespace: must be a DNS-1123 label, got {namespace!r}")
    for field in ("labels", "annotations"):
        value = md.get(field)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            errors.append(f"{where}: metadata.{field}: must be a mapping of strings")
    return errors


def who(request: Request) -> str:
    """The author recorded for a change: the authenticated principal, else the client's name."""
    principal = getattr(request, "principal", None)
    name = getattr(principal, "name", None)
    return name or request.headers.get("x-meshctl-user") or "api"


class DeliveryApi:
    def __init__(self, store, controller: DeliveryController, *, security=None):
        self.store = store
        self.controller = controller
        # the control plane's authentication (controlplane.security, when enabled): reads need a
        # view token, writes and actions an edit token, like the networking kinds; the console's
        # static files are public (they hold no data; the page asks for a token on a 401)
        self.security = security
        self.traffic = TrafficView(controller, store)

    async def handle(self, request: Request) -> Response | None:
        """The answer for a delivery path, or None when the path is not ours."""
        allowed = []
        for method, pattern, name in ROUTES:
            match = pattern.match(request.path)
            if match:
                if method == request.method:
                    try:
                        if self.security is not None and name != "ui":
                            request.principal = await self.security.authenticate(request)
                            self.security.authorize(request.principal, f"delivery_{name}", request.method,
                                                    request.path)
                        return await getattr(self, "_" + name)(request, **match.groupdict())
                    except StoreError as exc:
                        return status_response(exc.code, exc.reason, str(exc))
                    except Exception as exc:        # the security module's Denied (401/403)
                        if isinstance(getattr(exc, "code", None), int) and hasattr(exc, "reason"):
                            return status_response(exc.code, exc.reason, str(exc))
                        raise
                allowed.append(method)
        if allowed:
            return status_response(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path} "
                                                            f"(allowed: {', '.join(allowed)})")
        if (request.path.startswith(f"/apis/{GROUP}/") and request.path.rstrip("/").count("/") > 3) or \
                request.path.startswith(("/ui/", "/delivery/")):
            # below /apis/<group>/<version>: ours; the group's discovery documents are the API's
            return status_response(404, "NotFound", f"no route for {request.method} {request.path}")
        return None

    # ------------------------------------------------------------ reads

    async def with_status(self, obj: dict) -> dict:
        md = obj["metadata"]
        status = await self.controller.status_of((md["namespace"], md["name"]))
        out = dict(obj)
        out["status"] = status if status is not None else {"phase": "Pending", "message": "not picked up yet"}
        return out

    def _items(self, namespace: str | None) -> list[dict]:
        items = [o for (k, ns, _), o in self.store.resources().items() if k == KIND and namespace in (None, ns)]
        return sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))

    async def _list_all(self, request):
        return await self._list(request, None)

    async def _list(self, request, ns):
        items = [await self.with_status(o) for o in self._items(ns)]
        return Response.json(200, {"apiVersion": API_VERSION, "kind": f"{KIND}List", "metadata": {}, "items": items})

    def _get_obj(self, ns: str, name: str) -> dict:
        obj = self.store.resources().get((KIND, ns, name))
        if obj is None:
            raise NotFound(f"{KIND} {ns}/{name} not found")
        return obj

    async def _get(self, request, ns, name):
        return Response.json(200, await self.with_status(self._get_obj(ns, name)))

    async def _events(self, request, ns, name):
        self._get_obj(ns, name)
        status = await self.controller.status_of((ns, name)) or {}
        return Response.json(200, {"items": status.get("events") or []})

    # ------------------------------------------------------------ writes

    async def _write(self, request, ns, name, create_only):
        body = parse_body(request)
        if not isinstance(body, dict):
            raise BadRequest("request body must be one object (a mapping)")
        errors = check_metadata(body, ns, name)
        obj_name = (body.get("metadata") or {}).get("name") if isinstance(body.get("metadata"), dict) else None
        label = name or obj_name or "?"
        if errors:
            return invalid(KIND, ns, label, errors)
        md = body["metadata"]
        obj = {"apiVersion": API_VERSION, "kind": KIND,
               "metadata": {k: md[k] for k in ("name", "labels", "annotations") if k in md} | {"namespace": ns},
               "spec": body.get("spec")}
        decoded = decode_canary(obj)
        errors = decoded.errors or check_references(decoded.spec, self.store.resources())
        if errors:
            return invalid(KIND, ns, label, errors)
        headers = [("warning", f'299 - "{w}"'.encode("ascii", "replace").decode()) for w in decoded.warnings]
        if request.query.get("dryRun") == "All":
            return Response(200, Response.json(200, obj).body, headers=headers)
        existed = (KIND, ns, md["name"]) in self.store.resources()
        expect = md.get("resourceVersion")
        stored = await self.store.put(obj, expect_version=str(expect) if expect else None, create_only=create_only,
                                      origin=who(request))
        return Response(200 if existed else 201, Response.json(200, stored).body, headers=headers)

    async def _create(self, request, ns):
        return await self._write(request, ns, None, True)

    async def _replace(self, request, ns, name):
        return await self._write(request, ns, name, False)

    async def _delete(self, request, ns, name):
        obj = self._get_obj(ns, name)
        if request.query.get("dryRun") == "All":
            return Response.json(200, obj)
        gone = await self.store.delete((KIND, ns, name), expect_version=request.query.get("resourceVersion"),
                                       origin=who(request))
        return Response.json(200, gone)

    async def _action(self, request, ns, name, action):
        self._get_obj(ns, name)
        by = who(request)
        await self.controller.request_action((ns, name), action, by)
        return Response.json(202, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                   "message": f"{action} of {KIND} {ns}/{name} requested by {by}"})

    # ------------------------------------------------------------ the console

    async def _leader(self, request):
        leadership = self.controller.leadership
        return Response.json(200, {"replica": getattr(leadership, "replica_id", "local"), "leader": leadership.holder,
                                   "isLeader": leadership.is_leader})

    async def _traffic(self, request):
        return Response.json(200, await self.traffic.read())

    async def _ui(self, request, asset: str = "index.html"):
        response = console_asset(asset)
        if response is None:
            raise NotFound(f"no console asset {asset!r}")
        return response
