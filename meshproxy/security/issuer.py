"""The control plane as a certificate issuer (``POST /security/v1/certificates``).

First certificate: the bootstrap token (read from its file at each attempt, as a projected
service-account token would be) and the CSR.  Renewal: the CSR, the certificate being
renewed and a proof of possession (the CSR's bytes signed with that certificate's key), so
no token is needed again.  The control plane is verified against the ``--ca-file`` root for
the first request, then against the trust bundle that came with the certificate (which is
how a root rotation reaches the sidecar).  These requests carry no client certificate: an
expired one would fail the handshake instead of getting a clear answer.
"""
from __future__ import annotations

import asyncio
import base64
import json

import h11

from ..config.remote import _address, is_tls, json_request
from .manager import IssuedCertificate, IssuerError, WorkloadCertificate
from .tls import client_context

PATH = "/security/v1/certificates"


class ControlPlaneIssuer:
    def __init__(self, urls: list[str], token_file: str, ca_pem: bytes | None, *, ttl: float | None = None,
                 timeout: float = 5.0):
        self.urls = list(urls)
        self.token_file = token_file
        self.ca_pem = ca_pem
        self.ttl = ttl
        self.timeout = timeout
        self._next = 0

    def _context(self, renewing: WorkloadCertificate | None):
        bundle = renewing.bundle_pem if renewing is not None else self.ca_pem
        if not bundle:
            raise IssuerError("an https control plane needs --ca-file (its root certificate)", retryable=False)
        return client_context(bundle, check_hostname=True)

    def _body(self, csr_pem: bytes, renewing: WorkloadCertificate | None) -> dict:
        body: dict = {"csr": csr_pem.decode()}
        if self.ttl:
            body["ttl"] = self.ttl
        if renewing is not None:
            body["certificate"] = renewing.leaf_pem.decode()
            body["proof"] = base64.b64encode(renewing.sign(csr_pem)).decode()
            return body
        try:
            with open(self.token_file) as f:
                body["token"] = f.read().strip()
        except OSError as exc:
            raise IssuerError(f"cannot read the bootstrap token file {self.token_file}: {exc.strerror}",
                              retryable=False) from None
        return body

    async def issue(self, csr_pem: bytes, renewing: WorkloadCertificate | None) -> IssuedCertificate:
        body = self._body(csr_pem, renewing)
        problems = []
        for i in range(len(self.urls)):
            url = self.urls[(self._next + i) % len(self.urls)]
            host, port = _address(url)
            try:
                ctx = self._context(renewing) if is_tls(url) else None
                async with asyncio.timeout(self.timeout):
                    status, payload = await json_request(host, port, "POST", PATH, body, ctx)
            except (OSError, asyncio.TimeoutError, h11.ProtocolError) as exc:
                problems.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            self._next = (self._next + i) % len(self.urls)
            try:
                answer = json.loads(payload or b"{}")
            except ValueError:
                answer = {"message": payload[:200].decode(errors="replace")}
            if status == 200:
                try:
                    return IssuedCertificate(answer["certificate_chain"].encode(), answer["trust_bundle"].encode())
                except (KeyError, AttributeError):
                    raise IssuerError(f"{url}: malformed certificate answer") from None
            message = f"{url}: {status} {answer.get('message', '')}"
            if 400 <= status < 500:
                raise IssuerError(message, retryable=False)
            problems.append(message)
        self._next += 1
        raise IssuerError("; ".join(problems) or "no control plane to ask")
