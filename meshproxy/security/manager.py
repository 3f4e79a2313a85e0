"""The workload certificate manager: key, CSR, short-lived certificate, renewal, contexts.

See the package docstring (:mod:`meshproxy.security`) for the API other modules use.

Life of a certificate::

    start()  -> new key (never leaves this process) -> CSR -> issuer -> WorkloadCertificate
    run()    -> sleeps until about half the lifetime (Istio's SECRET_GRACE_PERIOD_RATIO 0.5,
                jitter +-1%), renews with a new key, swaps ``current``, tells subscribers;
                on failure retries with backoff and keeps serving the certificate it has
                until it expires (``state`` says "renewal-failing", then "expired")

Contexts are built once per certificate (and per ALPN list / client-certificate mode) and
cached; a renewal only changes which cached context new connections get.  The server side's
fronts (:class:`~meshproxy.security.tls.RotatingServerContext`) are new per certificate too:
they hold the keys of the TLS session tickets they issue, so a session made under an old
certificate or trust bundle is not resumed after a renewal or a root rotation.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from .spiffe import SpiffeId
from .tls import RotatingServerContext, client_context, server_context

log = logging.getLogger("meshproxy.security")

RENEW_RATIO = 0.5
RENEW_JITTER = 0.01

# states of a manager (``status()["state"]``)
PENDING = "pending"                  # no certificate yet
VALID = "valid"                      # a certificate, renewals succeeding
RENEWAL_FAILING = "renewal-failing"  # a valid certificate, but the last renewal failed (CA down?)
EXPIRED = "expired"                  # the certificate expired and no new one could be had


class IssuerError(Exception):
    """The issuer refused or could not be reached; ``retryable`` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    chain_pem: bytes          # leaf first (then intermediates, if any)
    bundle_pem: bytes         # trust roots, one or more PEM certificates


class CertificateIssuer(Protocol):
    async def issue(self, csr_pem: bytes, renewing: "WorkloadCertificate | None") -> IssuedCertificate:
        """Sign ``csr_pem``.  ``renewing`` is the certificate being replaced (None for the
        first one); an issuer may prove possession of its key with :meth:`WorkloadCertificate.sign`."""
        ...


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """One issued certificate with its key and the trust bundle that came with it (immutable)."""
    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes
    not_before: float
    not_after: float
    serial: str
    roots: tuple[str, ...]        # SHA-256 fingerprints (hex) of the bundle's roots

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    @property
    def leaf_pem(self) -> bytes:
        end = b"-----END CERTIFICATE-----"
        return self.chain_pem[: self.chain_pem.index(end) + len(end)] + b"\n"

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with this certificate's key (proof of possession for a renewal)."""
        key = serialization.load_pem_private_key(self.key_pem, None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> "WorkloadCertificate":
        """Parse and check an issued chain: the leaf's one URI SAN is the identity, the key matches."""
        certs = x509.load_pem_x509_certificates(chain_pem)
        leaf = certs[0]
        try:
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise ValueError(f"workload certificate must carry exactly one URI SAN, has {uris}")
        key = serialization.load_pem_private_key(key_pem, None)
        pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if pub(key.public_key()) != pub(leaf.public_key()):
            raise ValueError("the issued certificate is not for this key")
        roots = x509.load_pem_x509_certificates(bundle_pem)
        return cls(identity=SpiffeId.parse(uris[0]), chain_pem=chain_pem, key_pem=key_pem, bundle_pem=bundle_pem,
                   not_before=leaf.not_valid_before_utc.timestamp(), not_after=leaf.not_valid_after_utc.timestamp(),
                   serial=format(leaf.serial_number, "x"),
                   roots=tuple(r.fingerprint(hashes.SHA256()).hex() for r in roots))


def new_key(key_type: str = "ec-p256"):
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(65537, 2048)
    raise ValueError(f"unknown key type {key_type!r} (ec-p256, rsa-2048)")


def make_csr(identity: SpiffeId, key) -> bytes:
    """A CSR with the identity as its one URI SAN (and an empty subject, like Istio's)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.trust_domain)]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateManager:
    def __init__(self, identity: SpiffeId, issuer: CertificateIssuer, *, key_type: str = "ec-p256",
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 renew_ratio: float = RENEW_RATIO, retry_base: float = 0.2, retry_max: float = 30.0,
                 initial: WorkloadCertificate | None = None):
        self.identity = identity
        self.issuer = issuer
        self.key_type = key_type
        self._clock = clock
        self._rng = rng or random.Random()
        self.renew_ratio = renew_ratio
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._current: WorkloadCertificate | None = initial
        self._subscribers: list[Callable[[WorkloadCertificate], None]] = []
        self._contexts: dict[tuple, ssl.SSLContext] = {}     # per current certificate; cleared on swap
        self._fronts: dict[tuple, RotatingServerContext] = {}
        self.renewals = {"success": 0, "failure": 0}
        self.last_error = ""
        self.last_renewal_at: float | None = None
        self._failing = False

    # ------------------------------------------------------------ lifecycle

    @property
    def current(self) -> WorkloadCertificate | None:
        return self._current

    async def start(self, timeout: float = 30.0) -> WorkloadCertificate:
        """Get the first certificate (unless one was given); raises IssuerError on refusal or timeout."""
        if self._current is not None:
            return self._current
        async with asyncio.timeout(timeout):
            delay = self.retry_base
            while True:
                try:
                    return await self._renew()
                except IssuerError as exc:
                    if not exc.retryable:
                        raise
                    log.warning("workload certificate: %s; retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(self.retry_max, delay * 2)

    async def run(self) -> None:
        """Renew forever (until cancelled).  Never raises for issuer failures."""
        failures = 0
        while True:
            cert = self._current
            now = self._clock()
            if failures == 0:
                share = self.renew_ratio * self._rng.uniform(1 - RENEW_JITTER, 1 + RENEW_JITTER)
                wait = cert.not_before + cert.lifetime * share - now
            else:
                wait = min(self.retry_max, self.retry_base * 2 ** min(failures - 1, 16)) * self._rng.uniform(0.5, 1.0)
                if now < cert.not_after:      # wake up at expiry to say so
                    wait = min(wait, max(0.0, cert.not_after - now) + 0.001)
            await asyncio.sleep(max(0.0, wait))
            try:
                await self._renew()
                failures = 0
            except IssuerError as exc:
                failures += 1
                log.warning("workload certificate renewal failed (%s); keeping the current one until %s",
                            exc, time.strftime("%H:%M:%S", time.gmtime(self._current.not_after)))
            except Exception as exc:   # a bug must not end renewals
                failures += 1
                self.renewals["failure"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._failing = True
                log.exception("workload certificate renewal crashed")

    async def _renew(self) -> WorkloadCertificate:
        key = new_key(self.key_type)
        csr = make_csr(self.identity, key)
        try:
            issued = await self.issuer.issue(csr, self._current)
            cert = WorkloadCertificate.from_pem(issued.chain_pem, key_pem(key), issued.bundle_pem)
            if cert.identity != self.identity:
                raise IssuerError(f"issuer returned a certificate for {cert.identity}, asked for {self.identity}",
                                  retryable=False)
        except IssuerError as exc:
            self.renewals["failure"] += 1
            self.last_error = str(exc)
            self._failing = True
            raise
        except (ValueError, TypeError) as exc:
            self.renewals["failure"] += 1
            self.last_error = f"unusable certificate from the issuer: {exc}"
            self._failing = True
            raise IssuerError(self.last_error) from exc
        self.install(cert)
        self.renewals["success"] += 1
        self.last_renewal_at = self._clock()
        self._failing = False
        self.last_error = ""
        return cert

    def install(self, cert: WorkloadCertificate) -> None:
        """Make ``cert`` current: new connections use it; open ones keep theirs."""
        self._current = cert
        self._contexts = {}
        self._fronts = {}         # new ticket keys: no resumption across certificates or bundles
        log.info("workload certificate %s serial %s valid until %s (%d root(s) trusted)", cert.identity,
                 cert.serial, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after)), len(cert.roots))
        for callback in list(self._subscribers):
            callback(cert)

    def subscribe(self, callback: Callable[[WorkloadCertificate], None]) -> None:
        """``callback(cert)`` after every renewal (on the event loop)."""
        self._subscribers.append(callback)

    # ------------------------------------------------------------ contexts

    def _require(self) -> WorkloadCertificate:
        if self._current is None:
            raise RuntimeError("no workload certificate yet (CertificateManager.start() first)")
        return self._current

    def server_context(self, *, alpn: tuple[str, ...] | None = None, client_cert: str = "required") -> ssl.SSLContext:
        """A server context for a listener: every new connection gets the current certificate
        and trust bundle.  ``client_cert``: "required" (mTLS), "optional", "none".  Ask for it
        per connection to resume only sessions of the current certificate (see the module
        docstring); a context kept longer keeps working, with the tickets it issued."""
        key = (tuple(alpn or ()), client_cert)
        front = self._fronts.get(key)
        if front is None:
            front = RotatingServerContext(lambda: self._server_ctx(key), client_cert=client_cert, alpn=alpn)
            self._fronts[key] = front
        return front.context

    def current_server_context(self, *, alpn: tuple[str, ...] | None = None,
                               client_cert: str = "required") -> ssl.SSLContext:
        """The server context of the current certificate itself (not a stable front): for a
        listener whose own SNI callback picks a context per connection (Gateway ISTIO_MUTUAL)."""
        return self._server_ctx((tuple(alpn or ()), client_cert))

    def _server_ctx(self, key: tuple) -> ssl.SSLContext:
        cache_key = ("server", *key)
        ctx = self._contexts.get(cache_key)
        if ctx is None:
            cert = self._require()
            ctx = server_context(cert.chain_pem, cert.key_pem, cert.bundle_pem, client_cert=key[1], alpn=key[0] or None)
            self._contexts[cache_key] = ctx
        return ctx

    def client_context(self, *, alpn: tuple[str, ...] | None = None, check_hostname: bool = False) -> ssl.SSLContext:
        """The context for one new outbound connection: presents the current certificate and
        verifies the server against the current bundle.  Call it per connection (it changes
        on renewal); check the server's SPIFFE id after the handshake with
        :func:`meshproxy.security.tls.check_peer`."""
        cache_key = ("client", tuple(alpn or ()), check_hostname)
        ctx = self._contexts.get(cache_key)
        if ctx is None:
            cert = self._require()
            ctx = client_context(cert.bundle_pem, cert.chain_pem, cert.key_pem, check_hostname=check_hostname,
                                 alpn=alpn)
            self._contexts[cache_key] = ctx
        return ctx

    # ------------------------------------------------------------ what it says about itself

    @property
    def state(self) -> str:
        cert = self._current
        if cert is None:
            return PENDING
        if self._clock() >= cert.not_after:
            return EXPIRED
        return RENEWAL_FAILING if self._failing else VALID

    def status(self) -> dict:
        """For /config_dump: identity, expiry, state, last error (never the key)."""
        cert = self._current
        now = self._clock()
        return {
            "identity": self.identity.uri,
            "state": self.state,
            "serial": cert.serial if cert else None,
            "not_before": _iso(cert.not_before) if cert else None,
            "not_after": _iso(cert.not_after) if cert else None,
            "expires_in_seconds": round(cert.not_after - now, 3) if cert else None,
            "trust_roots": list(cert.roots) if cert else [],
            "renewals": dict(self.renewals),
            "last_renewal": _iso(self.last_renewal_at) if self.last_renewal_at else None,
            "last_error": self.last_error or None,
        }

    def counters(self):
        """CounterSource for ProxyMetrics.attach: renewals by result."""
        return [("meshproxy_workload_cert_renewals_total", (result,), n) for result, n in self.renewals.items()]

    def gauges(self) -> list[tuple[str, tuple, float]]:
        cert = self._current
        if cert is None:
            return [("meshproxy_workload_cert_valid", (self.identity.uri,), 0)]
        valid = 1 if self._clock() < cert.not_after else 0
        return [("meshproxy_workload_cert_expiry_timestamp_seconds", (self.identity.uri,), cert.not_after),
                ("meshproxy_workload_cert_valid", (self.identity.uri,), valid),
                ("meshproxy_workload_cert_renewal_failing", (self.identity.uri,), 1 if self._failing else 0)]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def fingerprint(pem: bytes) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)).hexdigest()
