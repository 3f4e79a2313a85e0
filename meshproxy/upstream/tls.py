"""TLS origination: the client side of DestinationRule ``trafficPolicy.tls``.

:class:`UpstreamTlsContexts` turns a cluster's :class:`~meshproxy.config.model.UpstreamTls`
into the ``ssl`` arguments of a new upstream connection, and checks the server's
certificate after the handshake:

* ``SIMPLE``: verify the server against ``caCertificates`` (the system trust store when
  not set), unless ``insecureSkipVerify``; no client certificate.
* ``MUTUAL``: as SIMPLE, and present ``clientCertificate`` / ``privateKey`` (files).
* ``ISTIO_MUTUAL``: present the workload certificate and verify the server against the
  mesh trust bundle (both from the certificate manager, per new connection so a renewal
  applies at once); the server must prove a SPIFFE identity.

``sni`` is sent when set (the compiler sets the service's host name for SIMPLE/MUTUAL
without one, Istio's ``outbound_.<port>_.<subset>_.<host>`` for ISTIO_MUTUAL).
``subjectAltNames``, when set, must contain one of the server certificate's SANs (DNS or
URI, exact match); otherwise SIMPLE/MUTUAL check the host name, ISTIO_MUTUAL any
SPIFFE id.  Contexts built from files are cached per setting; a failure to load them is
a connect failure with the reason, never a plaintext fallback.

ISTIO_MUTUAL connections resume TLS sessions (:class:`SessionCache`): a new connection to an
endpoint offers the ticket of the last one, which saves both sidecars the certificate work of
a full handshake.  A ticket is offered only with the client context it came from (a renewed
certificate or trust bundle starts over with full handshakes), only before it expires and
before the server certificate it vouches for does; the server's identity is checked after
every handshake, resumed or not, from the certificate the session carries.
"""
from __future__ import annotations

import ssl
import time
from typing import Callable

from ..security.tls import FastSSLObject, load_key_pair, peer_certificate

SIMPLE = "SIMPLE"
MUTUAL = "MUTUAL"
ISTIO_MUTUAL = "ISTIO_MUTUAL"


class UpstreamTlsError(ConnectionError):
    """The upstream's TLS could not be set up or its identity is not the expected one."""


def certificate_sans(sans) -> list[str]:
    """The names ``subjectAltNames`` is matched against: ``sans`` as (kind, value) pairs."""
    return [value for kind, value in sans if kind in ("DNS", "URI", "IP Address")]


class ResumingContext:
    """Stands in for ``context`` for one new connection and offers ``session`` (what
    ``loop.create_connection(ssl=...)`` needs of a context: ``wrap_bio``)."""
    __slots__ = ("context", "session")

    def __init__(self, context: ssl.SSLContext, session: ssl.SSLSession):
        self.context = context
        self.session = session

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        try:
            return self.context.wrap_bio(incoming, outgoing, server_side, server_hostname, session=self.session)
        except ValueError:        # the session cannot be offered: a full handshake
            return self.context.wrap_bio(incoming, outgoing, server_side, server_hostname)


class _Entry:
    __slots__ = ("context", "source", "session", "not_after")

    def __init__(self, context, source, not_after: float):
        self.context = context
        self.source = source          # the last connection's SSLObject: its ticket, once it came
        self.session: ssl.SSLSession | None = None
        self.not_after = not_after    # the server certificate's expiry


class SessionCache:
    """The TLS session to offer per endpoint (address, port, SNI), at most ``size`` endpoints.
    TLS 1.3 tickets arrive after the handshake, with the first response: a connection is
    remembered (:meth:`keep`) and its session read when the next connection is opened."""

    def __init__(self, size: int = 1024, clock: Callable[[], float] = time.time):
        self.size = size
        self._clock = clock
        self._entries: dict[tuple, _Entry] = {}
        self.offered = 0

    def offer(self, context: ssl.SSLContext, endpoint: tuple) -> ssl.SSLSession | None:
        entry = self._entries.get(endpoint)
        if entry is None:
            return None
        if entry.context is not context:       # renewed certificate or bundle: start over
            del self._entries[endpoint]
            return None
        source = entry.source
        if source is not None:
            session = source.session
            if session is not None and session.has_ticket:
                entry.session = session
        session = entry.session
        if session is None:
            return None
        if self._clock() >= min(session.time + session.timeout, entry.not_after):
            entry.session = None
            return None
        self.offered += 1
        return session

    def keep(self, endpoint: tuple, ssl_object, not_after: float) -> None:
        """``ssl_object``: a verified connection to ``endpoint`` (its server checked)."""
        entry = self._entries.get(endpoint)
        if entry is None or entry.context is not ssl_object.context:
            if entry is None and len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[endpoint] = _Entry(ssl_object.context, ssl_object, not_after)
        else:
            entry.source = ssl_object
            entry.not_after = not_after

    def clear(self) -> None:
        self._entries.clear()


class UpstreamTlsContexts:
    """``ssl`` arguments per :class:`UpstreamTls` (owned by the worker's upstream pools).
    ``certificates``: returns the workload certificate manager, or None."""

    def __init__(self, certificates=lambda: None):
        self._certificates = certificates
        self._cache: dict = {}
        self.sessions = SessionCache()
        self.handshakes = {"full": 0, "resumed": 0}      # ISTIO_MUTUAL connections that passed

    def context(self, tls, endpoint: tuple | None = None):
        """None: plaintext (auto mTLS from a proxy without a workload certificate, as a
        client outside the mesh would send).  ``endpoint`` (address, port, SNI): ISTIO_MUTUAL
        offers the session of the last connection to it (a :class:`ResumingContext`)."""
        if tls.mode == ISTIO_MUTUAL:
            manager = self._certificates()
            if manager is None or manager.current is None:
                if tls.auto:
                    return None
                raise UpstreamTlsError("ISTIO_MUTUAL needs the workload certificate; this proxy has none")
            context = manager.client_context(alpn=tls.alpn)
            if endpoint is not None:
                session = self.sessions.offer(context, endpoint)
                if session is not None:
                    return ResumingContext(context, session)
            return context
        ctx = self._cache.get(tls)
        if ctx is None:
            ctx = self._cache[tls] = self._file_context(tls)
        return ctx

    @staticmethod
    def _file_context(tls) -> ssl.SSLContext:
        if tls.credential and not (tls.ca_pem or tls.certificate_pem):
            raise UpstreamTlsError(f"credentialName {tls.credential} is not available to this proxy (the "
                                   "config's warnings say why); refused")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.sslobject_class = FastSSLObject
        try:
            if tls.insecure_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                if tls.ca_pem:
                    ctx.load_verify_locations(cadata=tls.ca_pem.decode())
                elif tls.ca_certificates:
                    ctx.load_verify_locations(tls.ca_certificates)
                else:
                    ctx.load_default_certs()
                # subjectAltNames replace the host-name check (checked after the handshake)
                ctx.check_hostname = not tls.subject_alt_names
            if tls.mode == MUTUAL and tls.certificate_pem:
                load_key_pair(ctx, tls.certificate_pem, tls.key_pem)     # credentialName (a Secret)
            elif tls.mode == MUTUAL:
                ctx.load_cert_chain(tls.client_certificate, tls.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamTlsError(f"{tls.mode} TLS settings cannot be loaded: {exc}") from None
        if tls.alpn:
            ctx.set_alpn_protocols(list(tls.alpn))
        return ctx

    @staticmethod
    def server_hostname(tls, address: str) -> str | None:
        """The SNI (and, without subjectAltNames, the name checked): ``sni``, else a DNS
        endpoint's name."""
        if tls.sni:
            return tls.sni
        return address if tls.mode != ISTIO_MUTUAL and address and not _is_ip(address) else None

    def check_peer(self, tls, ssl_object, endpoint: tuple | None = None) -> str:
        """After the handshake (full or resumed): the server's identity against
        ``subjectAltNames`` (or, for ISTIO_MUTUAL without them, any SPIFFE id).  Raises
        :class:`UpstreamTlsError`.  An ISTIO_MUTUAL connection that passes is remembered
        for ``endpoint``'s next connection to resume, and its server's SPIFFE id returned
        (the one URI SAN of its certificate; "" for other modes)."""
        if tls.insecure_skip_verify and tls.mode != ISTIO_MUTUAL:
            return ""
        cert = peer_certificate(ssl_object)
        sans = certificate_sans(cert.sans if cert is not None else ())
        if tls.subject_alt_names:
            if not any(san in tls.subject_alt_names for san in sans):
                raise UpstreamTlsError(f"server certificate SANs {sans} match none of subjectAltNames "
                                       f"{list(tls.subject_alt_names)}")
        elif tls.mode == ISTIO_MUTUAL and not any(s.startswith("spiffe://") for s in sans):
            raise UpstreamTlsError(f"server certificate has no SPIFFE id (SANs {sans})")
        if cert is not None and tls.mode == ISTIO_MUTUAL:
            if cert.not_after <= time.time():
                # a resumed session vouches for the certificate it was made with: not past its expiry
                raise UpstreamTlsError("server certificate expired")
            self.handshakes["resumed" if ssl_object.session_reused else "full"] += 1
            if endpoint is not None:
                self.sessions.keep(endpoint, ssl_object, cert.not_after)
            uris = cert.uris
            return uris[0] if len(uris) == 1 and uris[0].startswith("spiffe://") else ""
        return ""

    def counters(self):
        """CounterSource for ProxyMetrics.attach: mesh mTLS handshakes, full or resumed."""
        return [("meshproxy_upstream_tls_handshakes_total", (kind,), n) for kind, n in self.handshakes.items()]


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
