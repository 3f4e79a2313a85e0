"""TLS termination for Gateway servers: :class:`TlsSettings` -> one ``ssl.SSLContext``.

The first certificate is the default; a client's SNI picks another certificate (exact
name, then ``*.parent``).  Protocol versions and TLS 1.2 cipher suites are set on every
context; the compiler only puts servers with equal versions and suites on one port,
because OpenSSL negotiates them on the context the connection started with, before the
SNI callback switches certificates.  (TLS 1.3 suites are OpenSSL's defaults: neither
Python's ``ssl`` nor Envoy lets a server configure them.)
"""
from __future__ import annotations

import ssl

from ..config.model import ServerCertificate, TlsSettings

VERSIONS = {"TLSV1_0": ssl.TLSVersion.TLSv1, "TLSV1_1": ssl.TLSVersion.TLSv1_1,
            "TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}


def certificate_context(cert: ServerCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[cert.min_version]
    ctx.maximum_version = VERSIONS[cert.max_version]
    if cert.cipher_suites:
        ctx.set_ciphers(":".join(cert.cipher_suites))
    ctx.load_cert_chain(cert.certificate, cert.private_key)
    return ctx


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    certs = tls.certificates
    default = certificate_context(certs[0])
    by_sni = {cert.sni.lower(): certificate_context(cert) for cert in certs}

    def pick(sock, server_name, _ctx):
        if server_name:
            name = server_name.lower()
            chosen = by_sni.get(name)
            if chosen is None:
                _, _, parent = name.partition(".")
                chosen = by_sni.get("*." + parent)
            if chosen is not None:
                sock.context = chosen
        return None

    default.sni_callback = pick
    return default
