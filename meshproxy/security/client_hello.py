"""A sans-IO reader of the first TLS record: is it a ClientHello, and what are its SNI
and ALPN protocols.  Used to decide a connection before any byte is consumed: PERMISSIVE
peer authentication (mTLS or plaintext) and Gateway PASSTHROUGH (route on SNI).

:func:`parse_client_hello` takes the bytes peeked so far and answers
:data:`NEED_MORE`, :data:`NOT_TLS`, or a :class:`ClientHello`.  A ClientHello whose
first record is cut short by the record length is read as far as it goes; a record
header that does not start a handshake is not TLS.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_RECORD = 16384 + 5             # the largest record a ClientHello's first fragment can be in
NEED_MORE = "need-more"
NOT_TLS = "not-tls"


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str = ""
    alpn: tuple[str, ...] = ()
    complete: bool = True          # the whole ClientHello was in the first record


def looks_like_tls(first: bytes) -> bool:
    """A TLS handshake record header (0x16 0x03 0x00..0x04): what PERMISSIVE peeks at."""
    return len(first) >= 1 and first[0] == 0x16 and (len(first) < 2 or first[1] == 0x03) and (
        len(first) < 3 or first[2] <= 0x04)


def record_length(data: bytes) -> int:
    """Bytes the first record needs (header included), or 0 if the header is not complete."""
    if len(data) < 5:
        return 0
    return 5 + int.from_bytes(data[3:5], "big")


def parse_client_hello(data: bytes):
    if not data:
        return NEED_MORE
    if not looks_like_tls(data[:3]):
        return NOT_TLS
    need = record_length(data)
    if need == 0:
        return NEED_MORE
    if need > MAX_RECORD or need < 9:
        return NOT_TLS
    if len(data) < need:
        return NEED_MORE
    body = data[5:need]
    if body[0] != 0x01:            # handshake type client_hello
        return NOT_TLS
    hello_len = int.from_bytes(body[1:4], "big")
    complete = hello_len + 4 <= len(body)
    try:
        return _extensions(body[4:4 + hello_len], complete)
    except (IndexError, ValueError):
        return NOT_TLS if complete else ClientHello(complete=False)


def _extensions(hello: bytes, complete: bool) -> ClientHello:
    pos = 2 + 32                                   # legacy_version, random
    pos += 1 + hello[pos]                          # session id
    pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")   # cipher suites
    pos += 1 + hello[pos]                          # compression methods
    if pos >= len(hello):
        return ClientHello(complete=complete)
    end = min(len(hello), pos + 2 + int.from_bytes(hello[pos:pos + 2], "big"))
    pos += 2
    sni = ""
    alpn: list[str] = []
    while pos + 4 <= end:
        kind = int.from_bytes(hello[pos:pos + 2], "big")
        size = int.from_bytes(hello[pos + 2:pos + 4], "big")
        ext = hello[pos + 4:pos + 4 + size]
        pos += 4 + size
        if kind == 0 and len(ext) >= 5:            # server_name: list, type 0 = host_name
            name_len = int.from_bytes(ext[3:5], "big")
            if ext[2] == 0:
                sni = ext[5:5 + name_len].decode("ascii", "replace").lower()
        elif kind == 16 and len(ext) >= 2:         # application_layer_protocol_negotiation
            i = 2
            while i < len(ext):
                n = ext[i]
                alpn.append(ext[i + 1:i + 1 + n].decode("ascii", "replace"))
                i += 1 + n
    return ClientHello(sni=sni, alpn=tuple(alpn), complete=complete)
