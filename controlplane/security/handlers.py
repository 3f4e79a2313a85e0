"""HTTP handlers for ``/security/v1/*`` (routes and permissions in :mod:`.service`)."""
from __future__ import annotations

from ..http import Response
from .service import Security


def _status(code: int, reason: str, message: str) -> Response:
    return Response.json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": message, "reason": reason, "code": code})


def _body(request):
    import json
    try:
        value = json.loads(request.body or b"null")
    except ValueError as exc:
        return None, _status(400, "BadRequest", f"request body is not JSON: {exc}")
    if not isinstance(value, dict):
        return None, _status(400, "BadRequest", "request body must be a JSON object")
    return value, None


class SecurityHandlers:
    def __init__(self, security: Security):
        self.security = security

    async def sec_certificates(self, request):
        body, error = _body(request)
        if error:
            self.security.metrics.csr.inc()
            self.security.metrics.csr_parse.inc()
            self.security.metrics.refused.labels("csr_parse").inc()
            return error
        code, result = await self.security.issue(body)
        if code != 200:
            return _status(code, result["reason"], result["message"])
        return Response.json(200, result)

    async def sec_roots(self, request):
        state = self.security.ca.state
        return Response.json(200, {"trust_domain": self.security.trust_domain, "phase": state.phase,
                                   "roots": [r.cert_pem.decode() for r in state.roots]})

    async def sec_ca(self, request):
        return Response.json(200, await self.security.ca_status())

    async def sec_rotate(self, request, step):
        try:
            return Response.json(200, await self.security.rotate(step, request.query.get("force") == "true"))
        except ValueError as exc:
            return _status(409, "Conflict", str(exc))

    async def sec_bootstrap_create(self, request):
        body, error = _body(request)
        if error:
            return error
        ttl = body.get("ttl", 3600)
        unknown = set(body) - {"namespace", "service_account", "ttl", "reusable"}
        if unknown:
            return _status(400, "BadRequest", f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool):
            return _status(400, "BadRequest", f"ttl must be seconds, got {ttl!r}")
        if not isinstance(body.get("reusable", False), bool):
            return _status(400, "BadRequest", "reusable must be true or false")
        try:
            result = await self.security.tokens.create_bootstrap(
                body.get("namespace") or "default", body.get("service_account") or "default", float(ttl),
                request.principal.name, self.security.trust_domain, reusable=body.get("reusable", False))
        except ValueError as exc:
            return _status(422, "Invalid", str(exc))
        return Response.json(201, result)

    async def sec_bootstrap_list(self, request):
        return Response.json(200, {"items": await self.security.tokens.list_bootstrap()})

    async def sec_api_create(self, request):
        body, error = _body(request)
        if error:
            return error
        unknown = set(body) - {"scope", "name", "ttl"}
        if unknown:
            return _status(400, "BadRequest", f"unknown field(s): {', '.join(sorted(unknown))}")
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool)):
            return _status(400, "BadRequest", f"ttl must be seconds, got {ttl!r}")
        try:
            result = await self.security.tokens.create_api(str(body.get("scope", "")), str(body.get("name", "")),
                                                           ttl, request.principal.name)
        except ValueError as exc:
            return _status(422, "Invalid", str(exc))
        return Response.json(201, result)

    async def sec_api_list(self, request):
        return Response.json(200, {"items": await self.security.tokens.list_api()})

    async def sec_api_revoke(self, request, tid):
        if not await self.security.tokens.revoke_api(tid):
            return _status(404, "NotFound", f"API token {tid} not found")
        return Response.json(200, {"id": tid, "revoked": True})
