"""The first TLS record read without consuming it: SNI and ALPN of a real ClientHello
(made by Python's ssl), at every split, and plaintext or garbage told apart."""
from __future__ import annotations

import ssl

from meshproxy.security.client_hello import NEED_MORE, NOT_TLS, ClientHello, parse_client_hello
from meshproxy.security.inbound import offers_istio_alpn


def _hello(sni: str | None, alpn=()) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_sni_and_alpn_of_a_real_client_hello_at_every_split():
    data = _hello("Shop.Example.com", ("istio-http/1.1", "istio", "http/1.1"))
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]) == NEED_MORE
    hello = parse_client_hello(data)
    assert hello == ClientHello("shop.example.com", ("istio-http/1.1", "istio", "http/1.1"))
    assert offers_istio_alpn(hello)
    assert not offers_istio_alpn(parse_client_hello(_hello("a.example", ("h2", "http/1.1"))))
    assert parse_client_hello(_hello(None)).sni == ""


def test_plaintext_and_garbage_are_not_tls():
    assert parse_client_hello(b"GET / HTTP/1.1\r\n") == NOT_TLS
    assert parse_client_hello(b"\x16\x03\x01\x00\x05\x02abcd") == NOT_TLS          # not a client_hello
    assert parse_client_hello(b"\x16\x03\x01\xff\xff") == NOT_TLS                  # longer than a record can be
    # a hello longer than its first record may continue in the next: TLS, read as far as it goes
    # (the handshake then decides; garbage fails it)
    assert parse_client_hello(b"\x16\x03\x01\x00\x40\x01" + b"\xff" * 63) == ClientHello(complete=False)
