"""Bootstrap tokens (a sidecar's first proof of identity) and API tokens (meshctl's).

Both are opaque strings ``<kind>.<id>.<secret>``; the store keeps only the secret's SHA-256
under the id, so a store dump hands out no usable token.

Bootstrap token (``mpb.``): bound to one identity (namespace + service account), expires
after its TTL, and is single use: the first valid CSR consumes it (an atomic delete in the
store, so two replicas cannot both accept it).  Presented again it is refused as replayed
(a tombstone remembers it until it would have expired); for another identity, refused.
A ``reusable`` token is instead valid for its identity until it expires, like a projected
Kubernetes service-account token (a sidecar that restarts presents it again).

API token (``mpa.``): a scope (``view`` < ``edit`` < ``admin``), a name recorded as the
author of every change made with it, an optional expiry; revocable.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from meshproxy.config.identity import SpiffeId, identity_errors

BOOTSTRAP = "bootstrap-tokens/"
BOOTSTRAP_USED = "bootstrap-tokens-used/"
API = "api-tokens/"
SCOPES = ("view", "edit", "admin")
DEFAULT_BOOTSTRAP_TTL = 3600.0
MAX_BOOTSTRAP_TTL = 7 * 24 * 3600.0
_TOKEN = re.compile(r"^(mpb|mpa)\.([0-9a-f]{16})\.([A-Za-z0-9_-]{32,64})$")


class TokenRefused(Exception):
    """``reason``: a short label for metrics (unknown, replayed, expired, wrong_identity, malformed)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _parse(token: str, kind: str) -> tuple[str, str]:
    match = _TOKEN.match(token.strip()) if isinstance(token, str) else None
    if not match or match.group(1) != kind:
        raise TokenRefused("malformed", "token is malformed")
    return match.group(2), match.group(3)


def _new(kind: str) -> tuple[str, str, str]:
    tid, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return f"{kind}.{tid}.{secret}", tid, secret


@dataclass(frozen=True, slots=True)
class ApiPrincipal:
    token_id: str
    name: str
    scope: str


class Tokens:
    def __init__(self, store, *, clock=time.time, cache_seconds: float = 5.0):
        self.store = store
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ApiPrincipal | None]] = {}   # token digest -> (until, principal)

    # ------------------------------------------------------------ bootstrap tokens

    async def create_bootstrap(self, namespace: str, service_account: str, ttl: float, created_by: str,
                               trust_domain: str, reusable: bool = False) -> dict:
        problems = identity_errors(namespace, service_account, trust_domain)
        if problems:
            raise ValueError("; ".join(problems))
        if not 0 < ttl <= MAX_BOOTSTRAP_TTL:
            raise ValueError(f"ttl must be in (0, {MAX_BOOTSTRAP_TTL:g}] seconds, got {ttl:g}")
        token, tid, secret = _new("mpb")
        now = self._clock()
        record = {"sha256": _digest(secret), "namespace": namespace, "service_account": service_account,
                  "created_at": now, "expires_at": now + ttl, "created_by": created_by, "reusable": reusable}
        await self.store.put_secret(BOOTSTRAP + tid, json.dumps(record))
        return {"token": token, "id": tid, "identity": SpiffeId(trust_domain, namespace, service_account).uri,
                "expires_at": record["expires_at"], "reusable": reusable}

    async def consume_bootstrap(self, token: str, identity: SpiffeId) -> dict:
        """Check ``token`` for ``identity`` and use it up; raises TokenRefused."""
        tid, secret = _parse(token, "mpb")
        raw = await self.store.get_secret(BOOTSTRAP + tid)
        now = self._clock()
        if raw is None:
            used = await self.store.get_secret(BOOTSTRAP_USED + tid)
            if used is not None and hmac.compare_digest(json.loads(used)["sha256"], _digest(secret)):
                raise TokenRefused("replayed", f"bootstrap token {tid} was already used "
                                               f"(at {_iso(json.loads(used)['used_at'])}); tokens are single use")
            raise TokenRefused("unknown", "bootstrap token is not known to this control plane")
        record = json.loads(raw)
        if not hmac.compare_digest(record["sha256"], _digest(secret)):
            raise TokenRefused("unknown", "bootstrap token is not known to this control plane")
        if now >= record["expires_at"]:
            await self.store.take_secret(BOOTSTRAP + tid)
            raise TokenRefused("expired", f"bootstrap token {tid} expired at {_iso(record['expires_at'])}")
        if (record["namespace"], record["service_account"]) != (identity.namespace, identity.service_account):
            raise TokenRefused("wrong_identity", f"bootstrap token {tid} is for namespace {record['namespace']} service "
                                                 f"account {record['service_account']}, not for {identity.uri}")
        if record.get("reusable"):
            return record
        if await self.store.take_secret(BOOTSTRAP + tid) is None:     # another request took it first
            raise TokenRefused("replayed", f"bootstrap token {tid} was already used; tokens are single use")
        await self.store.put_secret(BOOTSTRAP_USED + tid, json.dumps(
            {"sha256": record["sha256"], "used_at": now, "expires_at": record["expires_at"],
             "identity": identity.uri}))
        return record

    async def list_bootstrap(self) -> list[dict]:
        out = []
        for name, raw in sorted((await self.store.list_secrets(BOOTSTRAP)).items()):
            record = json.loads(raw)
            out.append({"id": name[len(BOOTSTRAP):], "namespace": record["namespace"],
                        "service_account": record["service_account"], "expires_at": record["expires_at"],
                        "created_by": record.get("created_by", ""), "reusable": record.get("reusable", False)})
        return out

    async def prune(self) -> None:
        """Forget expired bootstrap tokens and tombstones."""
        now = self._clock()
        for prefix in (BOOTSTRAP, BOOTSTRAP_USED):
            for name, raw in (await self.store.list_secrets(prefix)).items():
                if json.loads(raw).get("expires_at", 0) <= now:
                    await self.store.take_secret(name)

    # ------------------------------------------------------------ API tokens

    async def create_api(self, scope: str, name: str, ttl: float | None, created_by: str) -> dict:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not name or not re.match(r"^[A-Za-z0-9@._:-]{1,64}$", name):
            raise ValueError(f"name must be 1-64 of A-Z a-z 0-9 @ . _ : -, got {name!r}")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl:g}")
        token, tid, secret = _new("mpa")
        now = self._clock()
        record = {"sha256": _digest(secret), "scope": scope, "name": name, "created_at": now,
                  "expires_at": now + ttl if ttl else None, "created_by": created_by}
        await self.store.put_secret(API + tid, json.dumps(record))
        return {"token": token, "id": tid, "scope": scope, "name": name, "expires_at": record["expires_at"]}

    async def authenticate(self, token: str) -> ApiPrincipal:
        digest = _digest(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            if cached[1] is None:
                raise TokenRefused("unknown", "bearer token is not valid")
            return cached[1]
        try:
            principal = await self._lookup(token, now)
        except TokenRefused:
            self._remember(digest, now, None)
            raise
        self._remember(digest, now, principal)
        return principal

    def _remember(self, digest: str, now: float, principal: ApiPrincipal | None) -> None:
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._cache_seconds, principal)

    async def _lookup(self, token: str, now: float) -> ApiPrincipal:
        tid, secret = _parse(token, "mpa")
        raw = await self.store.get_secret(API + tid)
        if raw is None:
            raise TokenRefused("unknown", "bearer token is not valid (unknown or revoked)")
        record = json.loads(raw)
        if not hmac.compare_digest(record["sha256"], _digest(secret)):
            raise TokenRefused("unknown", "bearer token is not valid (unknown or revoked)")
        if record.get("expires_at") and now >= record["expires_at"]:
            raise TokenRefused("expired", f"bearer token {tid} expired at {_iso(record['expires_at'])}")
        return ApiPrincipal(tid, record["name"], record["scope"])

    async def list_api(self) -> list[dict]:
        out = []
        for name, raw in sorted((await self.store.list_secrets(API)).items()):
            record = json.loads(raw)
            out.append({"id": name[len(API):], "name": record["name"], "scope": record["scope"],
                        "expires_at": record.get("expires_at"), "created_by": record.get("created_by", "")})
        return out

    async def revoke_api(self, tid: str) -> bool:
        self._cache.clear()
        return await self.store.take_secret(API + tid) is not None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
