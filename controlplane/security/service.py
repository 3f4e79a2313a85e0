"""The control plane's security: the CA kept in the store, tokens, the API's TLS, and who
may do what.

``Security`` is built by the composition root (``ControlPlane``); the API asks it
``authenticate(request)`` and ``authorize(principal, route, request)`` before every handler,
and serves its routes (``ROUTES``) for certificates, tokens and the CA:

  POST   /security/v1/certificates         {csr, token} | {csr, certificate, proof} [ttl] -> chain + bundle
                                           (public: the token or the proof authenticates)
  GET    /security/v1/ca/roots             trust bundle (view)
  GET    /security/v1/ca                   CA state, rotation phase, what a step still waits for (admin)
  POST   /security/v1/ca/rotate/{step}     prepare | activate | finish  (?force=true skips the wait; admin)
  POST   /security/v1/bootstrap-tokens     {namespace, service_account, ttl} (admin)
  GET    /security/v1/bootstrap-tokens     (admin; never the secrets)
  POST   /security/v1/api-tokens           {scope, name, ttl?} (admin)
  GET    /security/v1/api-tokens           (admin)
  DELETE /security/v1/api-tokens/{id}      revoke (admin)

Who is asking (``Principal``): a bearer API token (scope view < edit < admin), a sidecar's
workload certificate (TLS client certificate: it may stream config for its own namespace,
ACK its own stream, and register/heartbeat/deregister only workloads of its own identity), or
nobody.  With ``--insecure-loopback`` there is no TLS and no authentication (today's local
demo): every caller is admin and changes are recorded under the ``x-meshctl-user`` header.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshproxy.config.identity import SpiffeId
from meshproxy.security.tls import RotatingServerContext, server_context

from .ca import (ACTIVATED, PREPARED, STABLE, CaState, CertificateAuthority, CsrRejected, generate_root)
from .tokens import SCOPES, Tokens, TokenRefused

log = logging.getLogger("controlplane.security")

CA_STATE = "ca/state"
ISSUED = "issued/"
LEVEL = {"view": 1, "edit": 2, "admin": 3}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str                         # recorded as the author of changes
    scope: str | None = None          # view | edit | admin (tokens); None for workloads / anonymous
    identity: SpiffeId | None = None  # a sidecar's workload identity

    def has(self, scope: str) -> bool:
        return self.scope is not None and LEVEL[self.scope] >= LEVEL[scope]


ANONYMOUS = Principal("anonymous")


class Denied(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.reason = reason


# route name -> what it needs: "public", a scope, or "workload+<scope>" (a sidecar for its own
# things, or a token with that scope).  Routes not listed: GET needs view, anything else edit.
PERMISSIONS = {
    "healthz": "public", "sec_certificates": "public",
    "create": "edit", "replace": "edit", "delete": "edit", "rollback": "edit",
    "register": "workload+edit", "heartbeat": "workload+edit", "deregister": "workload+edit",
    "stream": "workload+view", "ack": "workload+view",
    "sec_roots": "view",
    "sec_ca": "admin", "sec_rotate": "admin", "sec_bootstrap_create": "admin", "sec_bootstrap_list": "admin",
    "sec_api_create": "admin", "sec_api_list": "admin", "sec_api_revoke": "admin",
    # Secrets (Gateway credentials): only admins write them; reads never show their data
    "core_create": "admin", "core_replace": "admin", "core_patch": "admin", "core_delete": "admin",
}

ROUTES: list[tuple[str, re.Pattern, str]] = [(m, re.compile(p), h) for m, p, h in [
    ("POST", r"^/security/v1/certificates$", "sec_certificates"),
    ("GET", r"^/security/v1/ca/roots$", "sec_roots"),
    ("GET", r"^/security/v1/ca$", "sec_ca"),
    ("POST", r"^/security/v1/ca/rotate/(?P<step>prepare|activate|finish)$", "sec_rotate"),
    ("POST", r"^/security/v1/bootstrap-tokens$", "sec_bootstrap_create"),
    ("GET", r"^/security/v1/bootstrap-tokens$", "sec_bootstrap_list"),
    ("POST", r"^/security/v1/api-tokens$", "sec_api_create"),
    ("GET", r"^/security/v1/api-tokens$", "sec_api_list"),
    ("DELETE", r"^/security/v1/api-tokens/(?P<tid>[0-9a-f]{16})$", "sec_api_revoke"),
]]


class SecurityMetrics:
    """Istio's citadel_server_* names where Istio has one."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge
        kw = {"registry": registry}          # None: not registered anywhere (unit tests)
        self.csr = Counter("citadel_server_csr_count", "CSRs received.", **kw)
        self.issued = Counter("citadel_server_success_cert_issuance_count", "Certificates issued.", **kw)
        self.auth_failures = Counter("citadel_server_authentication_failure_count",
                                     "CSRs refused because the caller could not be authenticated.", **kw)
        self.csr_parse = Counter("citadel_server_csr_parsing_err_count", "CSRs that could not be parsed.", **kw)
        self.id_errors = Counter("citadel_server_id_extraction_err_count",
                                 "CSRs whose identity did not match the caller's.", **kw)
        self.refused = Counter("meshctl_security_refusals", "Certificate requests refused, by reason.",
                               ["reason"], **kw)
        self.api_auth = Counter("meshctl_api_auth_failures", "API requests refused by authentication "
                                "or authorization, by reason.", ["reason"], **kw)
        self.root_expiry = Gauge("citadel_server_root_cert_expiry_timestamp",
                                 "Unix time the signing root certificate expires.", **kw)


def parse_secret_readers(values) -> frozenset[tuple[str, str]]:
    """``NS/SA`` entries (a list, each may hold several separated by commas) -> {(ns, sa)}."""
    out = set()
    for value in values:
        for entry in str(value).split(","):
            entry = entry.strip()
            if not entry:
                continue
            ns, _, sa = entry.partition("/")
            if not ns or not sa or "/" in sa or "*" in entry:
                raise ValueError(f"--secret-readers: expected NAMESPACE/SERVICE_ACCOUNT (no wildcards), got {entry!r}")
            out.add((ns, sa))
    return frozenset(out)


class Security:
    def __init__(self, store, *, trust_domain: str = "cluster.local", workload_ttl: float = 24 * 3600.0,
                 max_workload_ttl: float = 90 * 24 * 3600.0, supplied: CaState | None = None, tls: bool = True,
                 hosts: tuple[str, ...] = (), registry=None, refresh_interval: float = 1.0,
                 secret_readers: tuple[str, ...] = ()):
        self.store = store
        self.secret_readers = parse_secret_readers(secret_readers)
        if self.secret_readers and not tls:
            raise ValueError("--secret-readers needs authenticated proxies: with --insecure-loopback the control "
                             "plane pushes no Secret to any proxy")
        self.trust_domain = trust_domain
        self.tls = tls
        self.hosts = list(hosts)
        self.supplied = supplied
        self.workload_ttl = workload_ttl
        self.max_workload_ttl = max_workload_ttl
        self.refresh_interval = refresh_interval
        self.tokens = Tokens(store)
        self.metrics = SecurityMetrics(registry)
        self.ca: CertificateAuthority | None = None
        self._serving: ssl.SSLContext | None = None
        self._front: RotatingServerContext | None = None
        self._refresher: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        state = self.supplied or await self._load_or_create()
        self.ca = CertificateAuthority(state, self.trust_domain, default_ttl=self.workload_ttl,
                                       max_ttl=self.max_workload_ttl)
        self._on_state(state, first=True)
        if self.supplied is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="ca-state-refresh")

    async def close(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)

    async def _load_or_create(self) -> CaState:
        raw = await self.store.get_secret(CA_STATE)
        if raw is None:
            root = generate_root(self.trust_domain)
            if await self.store.create_secret(CA_STATE, CaState((root,), root.fingerprint).to_json()):
                log.info("generated the mesh root CA %s", root.fingerprint[:16])
            raw = await self.store.get_secret(CA_STATE)      # ours, or another replica's that won
        return CaState.from_json(raw)

    async def _refresh_loop(self) -> None:
        """Pick up another replica's rotation step (and prune used-up records now and then)."""
        rounds = 0
        while True:
            await asyncio.sleep(self.refresh_interval)
            rounds += 1
            try:
                raw = await self.store.get_secret(CA_STATE)
                if raw is not None and raw != self.ca.state.to_json():
                    self._on_state(CaState.from_json(raw))
                if rounds % 60 == 0:
                    await self.tokens.prune()
                    await self._prune_issued()
            except Exception as exc:     # store down: keep the state we have
                log.warning("CA state refresh failed: %s", exc)

    def _on_state(self, state: CaState, *, first: bool = False) -> None:
        self.ca.set_state(state)
        self.metrics.root_expiry.set(state.signer.cert.not_valid_after_utc.timestamp())
        if self.tls:         # a new serving certificate (maybe from a new root) and client-cert bundle
            chain, key = self.ca.serving_certificate(self.hosts)
            self._serving = server_context(chain, key, state.bundle_pem, client_cert="optional", alpn=("http/1.1",))
            if self._front is None:
                self._front = RotatingServerContext(lambda: self._serving, client_cert="optional", alpn=("http/1.1",))
        if not first:
            log.info("CA state changed: phase %s, %d root(s), signing with %s", state.phase, len(state.roots),
                     state.signing[:16])

    @property
    def server_ssl(self) -> ssl.SSLContext | None:
        """The API/push port's TLS context (None with --insecure-loopback)."""
        return self._front.context if self._front else None

    # ------------------------------------------------------------ who may read Secrets

    def secret_refusal(self, principal: Principal | None, namespace: str) -> str:
        """"" when ``principal`` may be pushed the Secrets of ``namespace`` (the proxy's namespace),
        else why not.  Only a verified workload certificate counts (its SPIFFE id's namespace and
        service account), never what the proxy declares; tokens are not workload identities."""
        if not self.tls:
            return ("the control plane runs with --insecure-loopback (no proxy is authenticated) and pushes no "
                    "Secret; give this gateway its credential in its config files")
        if principal is None or principal.identity is None:
            return (f"{principal.name if principal else 'this proxy'} is not a workload certificate; Secrets go only "
                    "to a proxy whose workload identity is granted (meshctl serve --secret-readers NS/SA)")
        identity = principal.identity
        if identity.namespace == namespace and (identity.namespace, identity.service_account) in self.secret_readers:
            return ""
        return (f"{identity.uri} is not granted the Secrets of namespace {namespace} (granted: "
                f"{', '.join(f'{ns}/{sa}' for ns, sa in sorted(self.secret_readers)) or 'nobody'}; "
                "meshctl serve --secret-readers NS/SA)")

    # ------------------------------------------------------------ who is asking, and may they

    async def authenticate(self, request) -> Principal:
        if not self.tls:
            return Principal(request.headers.get("x-meshctl-user", "api"), "admin")
        auth = request.headers.get("authorization", "")
        if auth:
            kind, _, token = auth.partition(" ")
            if kind.lower() != "bearer" or not token.strip():
                self.metrics.api_auth.labels("malformed").inc()
                raise Denied(401, "Unauthorized", "Authorization header must be 'Bearer <token>'")
            try:
                p = await self.tokens.authenticate(token.strip())
            except TokenRefused as exc:
                self.metrics.api_auth.labels(exc.reason).inc()
                raise Denied(401, "Unauthorized", str(exc)) from None
            return Principal(f"token:{p.name}", p.scope)
        uris = getattr(request, "peer_uris", ())
        if len(uris) == 1:
            try:
                identity = SpiffeId.parse(uris[0])
            except ValueError:
                identity = None
            if identity is not None and identity.trust_domain == self.trust_domain:
                return Principal(identity.uri, None, identity)
        return ANONYMOUS

    def authorize(self, principal: Principal, route: str, method: str, path: str = "") -> None:
        need = PERMISSIONS.get(route) or ("view" if method == "GET" else "edit")
        if need == "public":
            return
        workload_ok = need.startswith("workload+")
        scope = need.split("+")[-1]
        if principal.has(scope) or (workload_ok and principal.identity is not None):
            return
        if principal is ANONYMOUS:
            self.metrics.api_auth.labels("unauthenticated").inc()
            raise Denied(401, "Unauthorized", f"{method} {path or route}: authentication required (a bearer token with "
                                              f"scope {scope}, e.g. from meshctl's credentials file)")
        self.metrics.api_auth.labels("forbidden").inc()
        has = f"scope {principal.scope}" if principal.scope else "a workload certificate"
        raise Denied(403, "Forbidden", f"{principal.name} ({has}) may not {method} {path or route}: needs scope {scope}")

    def check_own(self, principal: Principal, namespace: str, what: str) -> None:
        """A workload principal may act only inside its own namespace."""
        if principal.identity is not None and principal.scope is None and namespace != principal.identity.namespace:
            self.metrics.api_auth.labels("forbidden").inc()
            raise Denied(403, "Forbidden", f"{principal.name} may not {what} in namespace {namespace}")

    # ------------------------------------------------------------ certificates

    async def issue(self, body) -> tuple[int, dict]:
        self.metrics.csr.inc()
        try:
            return 200, await self._issue(body)
        except TokenRefused as exc:
            self.metrics.auth_failures.inc()
            self.metrics.refused.labels(f"token_{exc.reason}").inc()
            return 401, {"reason": "Unauthorized", "message": f"bootstrap token refused: {exc}"}
        except CsrRejected as exc:
            if exc.reason in ("csr_parse", "csr_signature", "csr_too_large", "csr_key"):
                self.metrics.csr_parse.inc()
            elif exc.reason in ("csr_identity", "identity_mismatch"):
                self.metrics.id_errors.inc()
            elif exc.reason.startswith("cert_") or exc.reason == "proof":
                self.metrics.auth_failures.inc()
            self.metrics.refused.labels(exc.reason).inc()
            code = 403 if exc.reason in ("identity_mismatch",) else (
                401 if exc.reason.startswith("cert_") or exc.reason == "proof" else 400)
            return code, {"reason": {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden"}[code],
                          "message": str(exc)}

    async def _issue(self, body) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise CsrRejected("csr_parse", "body must be a JSON object with 'csr' (PEM)")
        unknown = set(body) - {"csr", "token", "certificate", "proof", "ttl"}
        if unknown:
            raise CsrRejected("csr_parse", f"unknown field(s): {', '.join(sorted(unknown))}")
        csr_pem = body["csr"].encode()
        csr, identity = self.ca.check_csr(csr_pem)
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            raise CsrRejected("ttl", f"ttl must be a positive number of seconds, got {ttl!r}")
        ttl = min(float(ttl), self.workload_ttl) if ttl is not None else None
        superseded = None
        if isinstance(body.get("certificate"), str):
            old, old_identity = self.ca.verify_workload(body["certificate"].encode())
            if old_identity != identity:
                raise CsrRejected("identity_mismatch", f"CSR asks for {identity.uri} but the certificate renewed "
                                                       f"is for {old_identity.uri}")
            _verify_proof(old, body.get("proof"), csr_pem)
            superseded = format(old.serial_number, "x")
        elif isinstance(body.get("token"), str):
            try:
                await self.tokens.consume_bootstrap(body["token"], identity)
            except TokenRefused as exc:
                if exc.reason == "wrong_identity":
                    self.metrics.id_errors.inc()
                raise
        else:
            raise TokenRefused("missing", "a first certificate needs 'token' (a bootstrap token); "
                                          "a renewal needs 'certificate' and 'proof'")
        chain = self.ca.sign(csr, identity, ttl)
        cert = x509.load_pem_x509_certificate(chain)
        state = self.ca.state
        await self._record_issued(cert, identity, state, superseded)
        self.metrics.issued.inc()
        return {"identity": identity.uri, "certificate_chain": chain.decode(),
                "trust_bundle": state.bundle_pem.decode(),
                "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "serial": format(cert.serial_number, "x")}

    async def _record_issued(self, cert, identity: SpiffeId, state: CaState, superseded: str | None) -> None:
        """Remember live certificates (what a rotation step waits for); a renewal retires its predecessor."""
        record = {"identity": identity.uri, "not_after": cert.not_valid_after_utc.timestamp(),
                  "signer": state.signing, "bundle": [r.fingerprint for r in state.roots]}
        await self.store.put_secret(ISSUED + format(cert.serial_number, "x"), json.dumps(record))
        if superseded:
            await self.store.take_secret(ISSUED + superseded)

    async def _live_issued(self) -> list[dict]:
        now = time.time()
        return [json.loads(v) for v in (await self.store.list_secrets(ISSUED)).values()
                if json.loads(v)["not_after"] > now]

    async def _prune_issued(self) -> None:
        now = time.time()
        for name, raw in (await self.store.list_secrets(ISSUED)).items():
            if json.loads(raw)["not_after"] <= now:
                await self.store.take_secret(name)

    # ------------------------------------------------------------ rotation

    async def ca_status(self) -> dict:
        state = self.ca.state
        live = await self._live_issued()
        return {"trust_domain": self.trust_domain, "phase": state.phase, "supplied": state.supplied,
                "signing": state.signing,
                "roots": [{"fingerprint": r.fingerprint, "subject": r.cert.subject.rfc4514_string(),
                           "not_after": r.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
                          for r in state.roots],
                "live_certificates": len(live), "next_step": _next_step(state.phase),
                "waiting_for": self._outstanding(state, live)}

    @staticmethod
    def _outstanding(state: CaState, live: list[dict]) -> list[str]:
        """Identities whose live certificate the next step would leave behind."""
        bundle = {r.fingerprint for r in state.roots}
        if state.phase == PREPARED:      # activate: everyone must already trust the new root
            return sorted({c["identity"] for c in live if not bundle <= set(c["bundle"])})
        if state.phase == ACTIVATED:     # finish: everyone must hold a certificate from the new root
            return sorted({c["identity"] for c in live if c["signer"] != state.signing})
        return []

    async def rotate(self, step: str, force: bool) -> dict:
        await self._reload()
        state = self.ca.state
        if step != "prepare" and not force:
            waiting = self._outstanding(state, await self._live_issued())
            if waiting:
                raise ValueError(f"{step}: {len(waiting)} workload(s) still hold certificates from before the last "
                                 f"step: {', '.join(waiting[:5])}{' ...' if len(waiting) > 5 else ''}; wait for "
                                 f"their renewal (about half a certificate lifetime) or use --force")
        new = {"prepare": self.ca.prepared, "activate": self.ca.activated, "finish": self.ca.finished}[step]()
        await self.store.put_secret(CA_STATE, new.to_json())
        self._on_state(new)
        return await self.ca_status()

    async def _reload(self) -> None:
        if self.supplied is not None:
            return
        raw = await self.store.get_secret(CA_STATE)
        if raw is not None and raw != self.ca.state.to_json():
            self._on_state(CaState.from_json(raw))

    # ------------------------------------------------------------ credentials file

    def write_credentials(self, path: str, server: str, token: str) -> None:
        data = {"server": server, "ca": self.ca.bundle_pem.decode(), "token": token}
        write_private(path, json.dumps(data, indent=2) + "\n")


def write_private(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _next_step(phase: str) -> str:
    return {STABLE: "prepare", PREPARED: "activate", ACTIVATED: "finish"}[phase]


def _verify_proof(cert: x509.Certificate, proof, csr_pem: bytes) -> None:
    """The renewing sidecar signed the CSR bytes with the key of the certificate it renews."""
    if not isinstance(proof, str):
        raise CsrRejected("proof", "a renewal needs 'proof': the CSR signed with the current certificate's key")
    try:
        signature = base64.b64decode(proof, validate=True)
    except ValueError:
        raise CsrRejected("proof", "proof is not base64") from None
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, csr_pem, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, csr_pem, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise CsrRejected("proof", "unsupported key type in the renewed certificate")
    except InvalidSignature:
        raise CsrRejected("proof", "proof does not verify with the renewed certificate's key") from None


__all__ = ["Security", "Principal", "Denied", "ROUTES", "PERMISSIONS", "SCOPES", "write_private"]
