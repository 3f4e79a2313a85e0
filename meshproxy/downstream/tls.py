"""TLS termination for Gateway servers: one stable ``ssl.SSLContext`` per listener.

A listener is created once with :attr:`GatewayTls.front`, a context without a certificate
whose SNI callback (OpenSSL calls it for every ClientHello, with or without SNI) moves each
new connection onto the context of the server it names: exact name, then ``*.parent``,
else the first server.  :meth:`GatewayTls.update` swaps the servers under it, so a changed
Gateway or a rotated Secret reaches new connections without rebinding the port, and open
connections keep the certificate they started with.

What the front decides for every connection, because OpenSSL settles it before or outside
the SNI switch (``SSL_set_SSL_CTX`` copies the certificate, key and trust store, nothing
else): protocol versions and TLS 1.2 cipher suites (the compiler only puts servers with
equal versions and suites on one port) and whether a client certificate is asked for:
asked for (and verified if given) when any server of the port verifies clients.  (TLS 1.3 suites are OpenSSL's defaults:
neither Python's ``ssl`` nor Envoy lets a server configure them.)

A presented client certificate is verified during the handshake against the chosen server's
trust store (``caCertificates``, the Secret's ``ca.crt``, or the mesh roots for
ISTIO_MUTUAL).  What OpenSSL cannot check for Python (a certificate is required by this
server, ``subjectAltNames``, ``verifyCertificateSpki``/``Hash``) is checked by
:class:`ClientCertificateGate` when the handshake completes, before the HTTP connection
exists: a refused client never gets a byte of HTTP, and is counted by reason.  A certificate
that does not verify fails the handshake itself: the front's SSLObject class counts that (and
every other handshake failure: plaintext, no shared version or cipher, garbage) and makes the
event loop's TLS send OpenSSL's alert before the connection is dropped, so a client reads why
(``alert unknown ca``, ``alert certificate required`` where every server of the port requires
a certificate).  The checks made after the handshake end in a reset: Python's ``ssl`` cannot
send an alert of its own.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from typing import Callable

from ..config.model import CLIENT_VERIFYING_MODES, ServerCertificate, TlsSettings
from ..security.tls import load_key_pair, remember_server_name
from ..security.tls_transport import TlsTransport

VERSIONS = {"TLSV1_0": ssl.TLSVersion.TLSv1, "TLSV1_1": ssl.TLSVersion.TLSv1_1,
            "TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}

# refusal reasons (meshproxy_tls_handshake_failures_total{reason})
NO_CLIENT_CERTIFICATE = "client_certificate_required"
SAN_MISMATCH = "client_san_mismatch"
PIN_MISMATCH = "client_certificate_pin_mismatch"
UNTRUSTED_CLIENT = "client_certificate_untrusted"   # another CA, expired, not yet valid
PLAINTEXT = "plaintext_refused"
HANDSHAKE_FAILED = "handshake_failed"              # anything else (no shared version or cipher, garbage)
_FAILURES = {"CERTIFICATE_VERIFY_FAILED": UNTRUSTED_CLIENT, "TLSV1_ALERT_UNKNOWN_CA": UNTRUSTED_CLIENT,
             "HTTP_REQUEST": PLAINTEXT, "WRONG_VERSION_NUMBER": PLAINTEXT,
             "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CLIENT_CERTIFICATE}


def handshake_failure(err: ssl.SSLError) -> str:
    """The counted reason of a failed server handshake."""
    return _FAILURES.get(getattr(err, "reason", None) or "", HANDSHAKE_FAILED)

_CHOSEN = "_meshproxy_gateway_server"        # attribute the SNI callback leaves on the SSLObject


def _options(ctx: ssl.SSLContext, cert: ServerCertificate) -> None:
    ctx.minimum_version = VERSIONS[cert.min_version]
    ctx.maximum_version = VERSIONS[cert.max_version]
    if cert.cipher_suites:
        ctx.set_ciphers(":".join(cert.cipher_suites))


def certificate_context(cert: ServerCertificate) -> ssl.SSLContext:
    """The context of one server (files or Secret PEM; not ISTIO_MUTUAL, whose context is the
    workload certificate's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _options(ctx, cert)
    if cert.certificate_pem:
        load_key_pair(ctx, cert.certificate_pem, cert.key_pem)
    else:
        ctx.load_cert_chain(cert.certificate, cert.private_key)
    if cert.mode in CLIENT_VERIFYING_MODES:
        if cert.ca_pem:
            ctx.load_verify_locations(cadata=cert.ca_pem.decode())
        elif cert.ca_certificates:
            ctx.load_verify_locations(cafile=cert.ca_certificates)
        ctx.verify_mode = ssl.CERT_OPTIONAL if cert.mode == "OPTIONAL_MUTUAL" else ssl.CERT_REQUIRED
    return ctx


def verify_mode(certs) -> ssl.VerifyMode:
    """What the port asks of clients.  Every server requires a certificate (MUTUAL,
    ISTIO_MUTUAL): required at the TLS layer, so OpenSSL refuses a client without one with its
    alert (``certificate_required``).  Some servers verify clients, not all (or OPTIONAL_MUTUAL):
    a certificate is asked for, verified if given, and :class:`ClientCertificateGate` refuses a
    client without one where its server requires one, after the handshake."""
    modes = {c.mode for c in certs}
    if not modes & CLIENT_VERIFYING_MODES:
        return ssl.CERT_NONE
    return ssl.CERT_REQUIRED if modes <= {"MUTUAL", "ISTIO_MUTUAL"} else ssl.CERT_OPTIONAL


class GatewayTls:
    """The TLS side of one gateway listener.  ``workload()`` is the proxy's
    :class:`~meshproxy.security.CertificateManager` (None without a workload identity): the
    certificate and trust roots of ISTIO_MUTUAL servers."""

    def __init__(self, tls: TlsSettings, workload: Callable[[], object] = lambda: None,
                 on_failure: Callable[[str], None] | None = None, loop_tls: bool = False):
        self.workload = workload
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        front.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        front.sni_callback = self._pick
        if on_failure is not None or loop_tls:
            # asyncio's and uvloop's TLS drive the handshake through the context's SSLObject and
            # report a failure to no one: an SSLObject that counts its own; ``loop_tls`` (the
            # event loop's TLS, which drops the connection without sending the alert OpenSSL
            # wrote): the failure is held back once, so the alert goes out first
            front.sslobject_class = _counting_sslobject(on_failure or (lambda reason: None), loop_tls)
        self.front = front
        self._contexts: dict[ServerCertificate, ssl.SSLContext] = {}
        self._default: ServerCertificate | None = None
        self._by_sni: dict[str, ServerCertificate] = {}
        self.settings: TlsSettings | None = None
        self.update(tls)

    def update(self, tls: TlsSettings) -> None:
        """Serve ``tls`` from the next connection on.  Contexts of unchanged servers are kept
        (a Secret's new content is a new server value, so a rotation builds a new context)."""
        if tls == self.settings:
            return
        certs = tls.certificates
        contexts = {c: self._contexts.get(c) or certificate_context(c) for c in certs if c.mode != "ISTIO_MUTUAL"}
        _options(self.front, certs[0])
        self.front.verify_mode = verify_mode(certs)
        if self.front.verify_mode != ssl.CERT_NONE:
            # no resumption tickets where clients are verified: a session resumed under another
            # server name would skip the chosen server's trust store
            self.front.options |= ssl.OP_NO_TICKET
            self.front.num_tickets = 0
        by_sni: dict[str, ServerCertificate] = {}
        for c in certs:
            by_sni.setdefault(c.sni.lower(), c)
        self._contexts, self._by_sni, self._default, self.settings = contexts, by_sni, certs[0], tls

    def _context_of(self, cert: ServerCertificate) -> ssl.SSLContext | None:
        if cert.mode == "ISTIO_MUTUAL":
            manager = self.workload()
            if manager is None or manager.current is None:
                return None               # no workload certificate: the handshake fails (no certificate)
            return manager.current_server_context(client_cert="required")
        return self._contexts.get(cert)

    def _pick(self, ssl_object, server_name, _front) -> None:
        remember_server_name(ssl_object, server_name)
        cert = None
        if server_name:
            name = server_name.lower()
            cert = self._by_sni.get(name)
            if cert is None:
                _, _, parent = name.partition(".")
                cert = self._by_sni.get("*." + parent)
        if cert is None:
            cert = self._default
        ctx = self._context_of(cert) if cert is not None else None
        if ctx is not None:
            ssl_object.context = ctx
            setattr(ssl_object, _CHOSEN, cert)
        return None

    @staticmethod
    def refusal(ssl_object) -> str | None:
        """Why the client of a completed handshake is refused, or None: the chosen server's
        checks that OpenSSL does not make for us."""
        cert: ServerCertificate | None = getattr(ssl_object, _CHOSEN, None)
        if cert is None:
            return NO_CLIENT_CERTIFICATE if ssl_object is None else None
        if cert.mode not in CLIENT_VERIFYING_MODES:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return None if cert.mode == "OPTIONAL_MUTUAL" else NO_CLIENT_CERTIFICATE
        if cert.subject_alt_names:
            sans = {value for _, value in (ssl_object.getpeercert() or {}).get("subjectAltName", ())}
            if not sans.intersection(cert.subject_alt_names):
                return SAN_MISMATCH
        if cert.spki_sha256 or cert.cert_sha256:
            if not (hashlib.sha256(der).hexdigest() in cert.cert_sha256
                    or (cert.spki_sha256 and spki_sha256(der) in cert.spki_sha256)):
                return PIN_MISMATCH
        return None


def _counting_sslobject(on_failure: Callable[[str], None], alert_first: bool = False) -> type:
    """An SSLObject class that counts its failed handshakes.  ``alert_first``: a failed
    handshake is reported as "wants more data" once, which makes the event loop's TLS send what
    OpenSSL wrote (the alert: unknown CA, certificate required, protocol version...) before it
    waits; the next step (the client's next bytes, or its close after the alert) raises the
    failure, and the loop drops the connection.  Without it, the loop drops the connection at
    once and the client sees a reset (the handshake timeout bounds a client that stays)."""
    class CountingSSLObject(ssl.SSLObject):
        def do_handshake(self):
            failed = getattr(self, "_meshproxy_failed", None)
            if failed is not None:
                raise failed
            try:
                return super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as err:
                reason = handshake_failure(err)
                on_failure(reason)
                if not alert_first or reason == PLAINTEXT:      # not TLS: OpenSSL wrote no alert
                    raise
                self._meshproxy_failed = err
                raise ssl.SSLWantReadError("the handshake failed; its alert is sent first") from err
    return CountingSSLObject


def spki_sha256(der: bytes) -> str:
    """base64 SHA-256 of a certificate's SubjectPublicKeyInfo (Envoy's verify_certificate_spki)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    key = x509.load_der_x509_certificate(der).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class ClientCertificateGate(asyncio.Protocol):
    """The protocol of a TLS connection until its handshake completes: checks the client
    (:meth:`GatewayTls.refusal`); refused, the connection is aborted and counted; admitted,
    the real protocol takes the transport (``set_protocol``) and nothing stays in between."""

    __slots__ = ("make", "on_refused")

    def __init__(self, make: Callable[[], asyncio.BaseProtocol], on_refused: Callable[[str], None]):
        self.make = make
        self.on_refused = on_refused

    def connection_made(self, transport) -> None:
        reason = GatewayTls.refusal(transport.get_extra_info("ssl_object"))
        if reason is not None:
            self.on_refused(reason)
            transport.abort()
            return
        protocol = self.make()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def connection_lost(self, exc) -> None:
        pass



class TerminatingAcceptor:
    """Protocol factory (for ``loop.create_server``) of a gateway TLS server in front of TCP
    routes (``protocol: TLS`` with SIMPLE, MUTUAL, ...): each accepted connection is a
    :class:`~meshproxy.security.tls_transport.TlsTransport` on the listener's front context
    (the certificate picked by SNI as for HTTPS, the handshake failure counted and answered
    with OpenSSL's alert); once the handshake completes and :meth:`GatewayTls.refusal` admits
    the client, ``make()`` (the TCP proxy's protocol) gets the decrypted stream, half-close
    included.  Each handshake has ``handshake_timeout`` seconds; nothing is kept per connection
    once it is handed over."""

    __slots__ = ("loop", "tls", "make", "on_refused", "handshake_timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: GatewayTls, make: Callable[[], asyncio.Protocol],
                 on_refused: Callable[[str], None], handshake_timeout: float):
        self.loop = loop
        self.tls = tls
        self.make = make
        self.on_refused = on_refused
        self.handshake_timeout = handshake_timeout

    def __call__(self) -> asyncio.Protocol:
        transport = TlsTransport(self.loop, self.tls.front, server_side=True)
        timer = self.loop.call_later(self.handshake_timeout, transport.abort)
        transport.handshake.add_done_callback(lambda done: self._handshaken(transport, done, timer))
        return transport

    def _handshaken(self, transport, done: asyncio.Future, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if done.cancelled() or done.exception() is not None:
            return                       # counted by the front's SSLObject (a failure) or timed out
        reason = GatewayTls.refusal(transport.get_extra_info("ssl_object"))
        if reason is not None:
            self.on_refused(reason)
            transport.abort()
            return
        transport.attach(self.make())
