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
"""
from __future__ import annotations

import ssl

SIMPLE = "SIMPLE"
MUTUAL = "MUTUAL"
ISTIO_MUTUAL = "ISTIO_MUTUAL"


class UpstreamTlsError(ConnectionError):
    """The upstream's TLS could not be set up or its identity is not the expected one."""


def certificate_sans(cert: dict) -> list[str]:
    return [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI", "IP Address")]


class UpstreamTlsContexts:
    """``ssl`` arguments per :class:`UpstreamTls` (owned by the worker's upstream pools).
    ``certificates``: returns the workload certificate manager, or None."""

    def __init__(self, certificates=lambda: None):
        self._certificates = certificates
        self._cache: dict = {}

    def context(self, tls) -> ssl.SSLContext | None:
        """None: plaintext (auto mTLS from a proxy without a workload certificate, as a
        client outside the mesh would send)."""
        if tls.mode == ISTIO_MUTUAL:
            manager = self._certificates()
            if manager is None or manager.current is None:
                if tls.auto:
                    return None
                raise UpstreamTlsError("ISTIO_MUTUAL needs the workload certificate; this proxy has none")
            return manager.client_context(alpn=tls.alpn)
        ctx = self._cache.get(tls)
        if ctx is None:
            ctx = self._cache[tls] = self._file_context(tls)
        return ctx

    @staticmethod
    def _file_context(tls) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if tls.insecure_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                if tls.ca_certificates:
                    ctx.load_verify_locations(tls.ca_certificates)
                else:
                    ctx.load_default_certs()
                # subjectAltNames replace the host-name check (checked after the handshake)
                ctx.check_hostname = not tls.subject_alt_names
            if tls.mode == MUTUAL:
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

    @staticmethod
    def check_peer(tls, ssl_object) -> None:
        """After the handshake: the server's identity against ``subjectAltNames`` (or, for
        ISTIO_MUTUAL without them, any SPIFFE id).  Raises :class:`UpstreamTlsError`."""
        if tls.insecure_skip_verify and tls.mode != ISTIO_MUTUAL:
            return
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        sans = certificate_sans(cert or {})
        if tls.subject_alt_names:
            if not any(san in tls.subject_alt_names for san in sans):
                raise UpstreamTlsError(f"server certificate SANs {sans} match none of subjectAltNames "
                                       f"{list(tls.subject_alt_names)}")
        elif tls.mode == ISTIO_MUTUAL and not any(s.startswith("spiffe://") for s in sans):
            raise UpstreamTlsError(f"server certificate has no SPIFFE id (SANs {sans})")


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
