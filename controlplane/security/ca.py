"""The mesh certificate authority: roots, workload certificates from CSRs, the control
plane's own serving certificate, and root rotation.

State (:class:`CaState`, immutable) is one record in the store (``ca/state``) so every
replica signs with the same root: the first replica to start generates a root and creates
the record (create-only, so two replicas starting at once agree on one); the others read it.
Supplied files (``--ca-cert/--ca-key``) are used instead and never written to the store.

Root rotation moves the state through three phases (each a new record; every replica picks
it up within a second)::

    stable     bundle [A]        sign with A
    prepared   bundle [A, B]     sign with A     (sidecars pick up the two-root bundle at renewal)
    activated  bundle [A, B]     sign with B     (sidecars get B-signed certificates at renewal)
    stable     bundle [B]        sign with B     (finish: A dropped)

A peer holding either bundle of two adjacent phases verifies a peer certificate of either
adjacent phase, which is why no request fails during the rollover when each step waits until
every live certificate has been reissued (``CertificateAuthority.check_step`` says what is
still outstanding).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.config.identity import InvalidSpiffeId, SpiffeId

DEFAULT_WORKLOAD_TTL = 24 * 3600.0
MAX_WORKLOAD_TTL = 90 * 24 * 3600.0
ROOT_TTL = 10 * 365 * 24 * 3600.0
SERVING_TTL = 365 * 24 * 3600.0
MAX_CSR_BYTES = 16 * 1024
RSA_SIZES = (2048, 3072, 4096)
EC_CURVES = ("secp256r1", "secp384r1")

STABLE, PREPARED, ACTIVATED = "stable", "prepared", "activated"


class CsrRejected(Exception):
    """A CSR the CA will not sign; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Root:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def key(self):
        return serialization.load_pem_private_key(self.key_pem, None)


@dataclass(frozen=True, slots=True)
class CaState:
    roots: tuple[Root, ...]          # the trust bundle, oldest first
    signing: str                     # fingerprint of the root that signs
    phase: str = STABLE
    supplied: bool = False           # from --ca-cert/--ca-key (never stored)

    def to_json(self) -> str:
        return json.dumps({"roots": [{"cert": r.cert_pem.decode(), "key": r.key_pem.decode()} for r in self.roots],
                           "signing": self.signing, "phase": self.phase})

    @classmethod
    def from_json(cls, text: str) -> "CaState":
        data = json.loads(text)
        roots = tuple(Root(r["cert"].encode(), r["key"].encode()) for r in data["roots"])
        return cls(roots, data["signing"], data.get("phase", STABLE))

    @property
    def signer(self) -> Root:
        for root in self.roots:
            if root.fingerprint == self.signing:
                return root
        raise ValueError("the signing root is not in the bundle")

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(r.cert_pem for r in self.roots)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def generate_root(trust_domain: str, *, now: dt.datetime | None = None, ttl: float = ROOT_TTL) -> Root:
    """A self-signed ECDSA P-256 root for the trust domain (O=<trust domain>, like Istio's)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshproxy root {now.strftime('%Y%m%dT%H%M%S.%f')}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return Root(cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def load_supplied(cert_path: str, key_path: str) -> CaState:
    """``--ca-cert/--ca-key``: a CA certificate (must be a CA) and its key."""
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError as exc:
        raise ValueError(f"--ca-cert/--ca-key: not a PEM certificate and key: {exc}") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ValueError(f"--ca-cert {cert_path}: not a CA certificate (basicConstraints CA:TRUE missing)")
    pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub(cert.public_key()) != pub(key.public_key()):
        raise ValueError(f"--ca-key {key_path} does not belong to --ca-cert {cert_path}")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    root = Root(pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return CaState((root,), root.fingerprint, STABLE, supplied=True)


class CertificateAuthority:
    """Signs with the current :class:`CaState`; swap the state with :meth:`set_state`."""

    def __init__(self, state: CaState, trust_domain: str = "cluster.local", *,
                 default_ttl: float = DEFAULT_WORKLOAD_TTL, max_ttl: float = MAX_WORKLOAD_TTL,
                 clock=_now):
        self.state = state
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._clock = clock

    def set_state(self, state: CaState) -> None:
        self.state = state

    @property
    def bundle_pem(self) -> bytes:
        return self.state.bundle_pem

    # ------------------------------------------------------------ workload certificates

    def check_csr(self, csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, SpiffeId]:
        """Parse and check a CSR; returns it and the identity it asks for."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise CsrRejected("csr_too_large", f"CSR is {len(csr_pem)} bytes; at most {MAX_CSR_BYTES}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRejected("csr_parse", f"CSR is not a PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrRejected("csr_signature", "CSR signature does not verify")
        key = csr.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size not in RSA_SIZES:
                raise CsrRejected("csr_key", f"CSR RSA key of {key.key_size} bits; allowed {RSA_SIZES}")
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in EC_CURVES:
                raise CsrRejected("csr_key", f"CSR EC key on {key.curve.name}; allowed {EC_CURVES}")
        else:
            raise CsrRejected("csr_key", f"CSR key type {type(key).__name__} not allowed (RSA or ECDSA)")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrRejected("csr_identity", "CSR has no subjectAltName with a SPIFFE id") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        others = [g for g in san if not isinstance(g, x509.UniformResourceIdentifier)]
        if len(uris) != 1 or others:
            raise CsrRejected("csr_identity", f"CSR must name exactly one SPIFFE id and nothing else, has {list(san)}")
        try:
            identity = SpiffeId.parse(uris[0])
        except InvalidSpiffeId as exc:
            raise CsrRejected("csr_identity", str(exc)) from None
        if identity.trust_domain != self.trust_domain:
            raise CsrRejected("csr_identity", f"CSR trust domain {identity.trust_domain} is not this mesh's "
                                              f"({self.trust_domain})")
        return csr, identity

    def sign(self, csr: x509.CertificateSigningRequest, identity: SpiffeId, ttl: float | None = None) -> bytes:
        """A workload certificate (PEM, leaf then nothing: roots come in the bundle)."""
        ttl = self.default_ttl if ttl is None else ttl
        if not 0 < ttl <= self.max_ttl:
            raise CsrRejected("ttl", f"requested lifetime {ttl:g}s is outside (0, {self.max_ttl:g}]")
        root = self.state.signer
        root_cert = root.cert
        now = self._clock()
        not_after = min(now + dt.timedelta(seconds=ttl), root_cert.not_valid_after_utc)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root_cert.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(seconds=min(60.0, ttl * 0.05))).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                               critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),
                               critical=False)
                .sign(root.key(), hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def verify_workload(self, cert_pem: bytes) -> tuple[x509.Certificate, SpiffeId]:
        """A certificate this CA issued (under any root in the bundle), valid now: its identity."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise CsrRejected("cert_parse", f"certificate is not PEM: {exc}") from None
        for root in self.state.roots:
            try:
                cert.verify_directly_issued_by(root.cert)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise CsrRejected("cert_untrusted", "certificate was not issued by this mesh's CA")
        now = self._clock()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CsrRejected("cert_expired", f"certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
                                              f" to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
            identity = SpiffeId.parse(uris[0]) if len(uris) == 1 else None
        except (x509.ExtensionNotFound, InvalidSpiffeId):
            identity = None
        if identity is None:
            raise CsrRejected("cert_identity", "certificate carries no single SPIFFE id")
        return cert, identity

    def issuer(self, ttl: float | None = None) -> "LocalIssuer":
        """A :class:`meshproxy.security.manager.CertificateIssuer` that signs in-process (tests, tools)."""
        return LocalIssuer(self, ttl)

    # ------------------------------------------------------------ the control plane's own certificate

    def serving_certificate(self, hosts: list[str], ttl: float = SERVING_TTL) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) for the API/push port: DNS and IP SANs for ``hosts`` plus
        localhost/127.0.0.1/::1, and the control plane's SPIFFE id."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        seen = set()
        for host in ["localhost", "127.0.0.1", "::1", *hosts]:
            if not host or host in seen or host in ("0.0.0.0", "::"):
                continue
            seen.add(host)
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        names.append(x509.UniformResourceIdentifier(
            SpiffeId(self.trust_domain, "istio-system", "meshctl").uri))
        root = self.state.signer
        root_cert = root.cert
        now = self._clock()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                                         x509.NameAttribute(NameOID.COMMON_NAME, "meshctl control plane")]))
                .issuer_name(root_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1))
                .not_valid_after(min(now + dt.timedelta(seconds=ttl), root_cert.not_valid_after_utc))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),
                               critical=False)
                .sign(root.key(), hashes.SHA256()))
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    # ------------------------------------------------------------ rotation

    def prepared(self) -> CaState:
        s = self.state
        if s.supplied:
            raise ValueError("the root was supplied with --ca-cert/--ca-key: rotate it by restarting with new files")
        if s.phase != STABLE:
            raise ValueError(f"a rotation is already in progress (phase {s.phase})")
        return replace(s, roots=s.roots + (generate_root(self.trust_domain, now=self._clock()),), phase=PREPARED)

    def activated(self) -> CaState:
        s = self.state
        if s.phase != PREPARED:
            raise ValueError(f"activate needs phase prepared, the CA is {s.phase}")
        return replace(s, signing=s.roots[-1].fingerprint, phase=ACTIVATED)

    def finished(self) -> CaState:
        s = self.state
        if s.phase != ACTIVATED:
            raise ValueError(f"finish needs phase activated, the CA is {s.phase}")
        return replace(s, roots=tuple(r for r in s.roots if r.fingerprint == s.signing), phase=STABLE)


@dataclass(frozen=True, slots=True)
class Issued:
    """What a ``meshproxy.security.manager.CertificateIssuer`` returns (same fields as its
    IssuedCertificate; the control plane does not import the proxy's runtime)."""
    chain_pem: bytes
    bundle_pem: bytes


class LocalIssuer:
    """Signs in-process (tests, tools).  A refused CSR raises :class:`CsrRejected`."""

    def __init__(self, ca: CertificateAuthority, ttl: float | None):
        self.ca = ca
        self.ttl = ttl

    async def issue(self, csr_pem: bytes, renewing) -> Issued:
        csr, identity = self.ca.check_csr(csr_pem)
        return Issued(self.ca.sign(csr, identity, self.ttl), self.ca.bundle_pem)
