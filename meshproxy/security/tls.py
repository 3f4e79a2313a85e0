"""TLS contexts from in-memory PEM, peer identities, and a server context whose certificate
can change under it.

``ssl.SSLContext.load_cert_chain`` only reads files; the workload key is handed to it through
an anonymous memory file (``memfd``) so it never touches a disk.  A context captures its
certificate when a connection starts: connections keep the certificate they were opened
with, new ones get the current one.  :class:`RotatingServerContext` is one stable context a
listener is created with; its SNI callback moves every new connection onto the context of
the current certificate (OpenSSL's ``SSL_set_SSL_CTX``: certificate, key and trust store all
come from the new context), so a renewal or a root rotation reaches new connections without
rebinding the listener, and open connections are not touched.

The server side of Python's ``ssl`` does not expose the SNI a client sent; the server contexts
made here record it on the connection's ``SSLObject`` from their SNI callback
(:func:`requested_server_name`), so it lives and dies with the connection.

What a verified peer certificate says (its SANs, its expiry) is read once per certificate
(:func:`peer_certificate`, keyed by its DER) instead of decoding it at every connection.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Callable, Iterable

from .spiffe import InvalidSpiffeId, SpiffeId

MIN_VERSION = ssl.TLSVersion.TLSv1_2


def load_key_pair(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate chain (leaf first) and its key into ``ctx`` without a file on disk."""
    fd = os.memfd_create("meshproxy-tls", os.MFD_CLOEXEC)
    try:
        data = chain_pem.rstrip(b"\n") + b"\n" + key_pem
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class FastSSLObject(ssl.SSLObject):
    """An ``ssl.SSLObject`` whose ``read``, ``write`` and ``pending`` are the C methods
    themselves: ``SSLObject``'s only forward to them, and the event loop's TLS transport
    calls them for every record both ways, so this saves a Python frame per call.  Contexts
    make these by ``ctx.sslobject_class = FastSSLObject``."""

    @classmethod
    def _create(cls, *args, **kwargs):
        self = super()._create(*args, **kwargs)
        sslobj = self._sslobj
        self.read = sslobj.read           # read(size[, buffer]) as the transports call it
        self.write = sslobj.write
        self.pending = sslobj.pending
        return self


_SERVER_NAME = "meshproxy_server_name"


def remember_server_name(ssl_object, server_name: str | None) -> None:
    """From a server context's SNI callback: keep the client's SNI on its connection."""
    setattr(ssl_object, _SERVER_NAME, server_name or "")


def requested_server_name(ssl_object) -> str:
    """The SNI the client of a server-side TLS connection sent ("" if none, or if the
    connection's context does not record it)."""
    return getattr(ssl_object, _SERVER_NAME, "")


def _record_server_name(ssl_object, server_name, _ctx) -> None:
    remember_server_name(ssl_object, server_name)
    return None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.sslobject_class = FastSSLObject


def server_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes | None, *,
                   client_cert: str = "required", alpn: Iterable[str] | None = None) -> ssl.SSLContext:
    """A server context; ``client_cert`` is "required" (mTLS), "optional" or "none"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    load_key_pair(ctx, chain_pem, key_pem)
    if bundle_pem:
        ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.verify_mode = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}[client_cert]
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.sni_callback = _record_server_name
    return ctx


def client_context(bundle_pem: bytes, chain_pem: bytes | None = None, key_pem: bytes | None = None, *,
                   check_hostname: bool = False, alpn: Iterable[str] | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against ``bundle_pem``.  Mesh peers are
    checked by SPIFFE id (:func:`check_peer`), not host name, so ``check_hostname`` is off
    unless asked (the control plane's certificate names its DNS names and addresses)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    if chain_pem and key_pem:
        load_key_pair(ctx, chain_pem, key_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class RotatingServerContext:
    """One stable server ``SSLContext`` (``.context``) that serves whatever ``current()``
    returns at each new connection.  ``current()`` must return contexts built with the same
    ``client_cert`` mode and ALPN list as this one (the connection keeps the front's verify
    mode; ALPN is chosen by the context it was moved to)."""

    def __init__(self, current: Callable[[], ssl.SSLContext], *, client_cert: str = "required",
                 alpn: Iterable[str] | None = None):
        self._current = current
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(front)
        front.verify_mode = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
                             "none": ssl.CERT_NONE}[client_cert]
        if alpn:
            front.set_alpn_protocols(list(alpn))
        # tickets are encrypted with this context's keys; a resuming client needs only the latest
        front.num_tickets = 1
        front.sni_callback = self._switch
        self._front = front

    @property
    def context(self) -> ssl.SSLContext:
        return self._front

    def _switch(self, ssl_object, server_name, _front) -> None:
        remember_server_name(ssl_object, server_name)
        ssl_object.context = self._current()
        return None


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What a verified peer certificate says, decoded once per certificate."""
    sans: tuple[tuple[str, str], ...]      # (kind, value) as ``getpeercert()`` gives them
    not_after: float                       # epoch seconds

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(value for kind, value in self.sans if kind == "URI")


_PEER_CERTS: dict[bytes, PeerCertificate] = {}
PEER_CACHE_SIZE = 4096


def peer_certificate(ssl_object) -> PeerCertificate | None:
    """The peer's certificate of a TLS connection, if it was verified (None when there is no
    certificate or the connection does not verify peers: exactly when ``getpeercert()`` has
    nothing to say).  Decoded once per certificate: later connections with the same DER
    (every connection of a peer until it renews) find it in a bounded cache."""
    if ssl_object is None or ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = _PEER_CERTS.get(der)
    if cert is None:
        decoded = ssl_object.getpeercert()
        if not decoded:
            return None
        cert = PeerCertificate(sans=tuple(decoded.get("subjectAltName", ())),
                               not_after=ssl.cert_time_to_seconds(decoded["notAfter"]))
        if len(_PEER_CERTS) >= PEER_CACHE_SIZE:
            del _PEER_CERTS[next(iter(_PEER_CERTS))]       # the oldest entry
        _PEER_CERTS[der] = cert
    return cert


def peer_uris(ssl_object) -> tuple[str, ...]:
    """URI SANs of the verified peer certificate (empty if there is none)."""
    cert = peer_certificate(ssl_object)
    return cert.uris if cert is not None else ()


def peer_identity(ssl_object) -> SpiffeId | None:
    """The peer's SPIFFE id, from the one URI SAN of its verified certificate; None if it
    has no certificate, no URI SAN, or more than one."""
    uris = peer_uris(ssl_object)
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId:
        return None


class PeerIdentityMismatch(ssl.SSLError):
    pass


def check_peer(ssl_object, allowed: Iterable[str | SpiffeId]) -> SpiffeId:
    """Raise :class:`PeerIdentityMismatch` unless the peer's SPIFFE id is one of ``allowed``."""
    peer = peer_identity(ssl_object)
    wanted = {str(a) for a in allowed}
    if peer is None or peer.uri not in wanted:
        got = peer.uri if peer else (",".join(peer_uris(ssl_object)) or "no SPIFFE id")
        raise PeerIdentityMismatch(f"peer identity {got} is not one of {sorted(wanted)}")
    return peer
