"""Istio's HTTP peer metadata exchange: who is on the other side, for the telemetry labels.

Two sidecars tell each other their workload in two headers (Istio's ``istio_headers``
discovery and propagation of the ``peer_metadata`` filter):

* ``x-envoy-peer-metadata``: base64 of a serialized ``google.protobuf.Struct`` with the
  workload's ``NAMESPACE``, ``WORKLOAD_NAME``, ``CLUSTER_ID``, ``NAME``, ``SERVICE_ACCOUNT``
  and ``LABELS`` (its labels plus ``app``/``version`` and the canonical service and revision);
* ``x-envoy-peer-metadata-id``: the sender's node id.

The client sidecar adds them to requests it sends over mesh mutual TLS (never to other
upstreams, never to its own application); the server sidecar reads and removes them before
its application sees the request, and answers with its own on the response, which the client
sidecar reads and removes.  The proxy removes the two headers from everything an application
sends or receives, so an application can neither forge nor see them.

Trust (what this module decides, per value and connection):

* Over plaintext nothing is trusted: anyone can write two headers.  Istio accepts them on
  plaintext too; here a plaintext caller (PERMISSIVE) is not labelled as a workload.
* Over mutual TLS the peer's verified SPIFFE id ``spiffe://TD/ns/NS/sa/SA`` must name the
  metadata's ``NAMESPACE``, else the metadata is ignored.  (Istio takes the namespace label from
  the SAN and keeps the rest of the metadata; a peer whose metadata and certificate disagree
  is not believed about anything here.)  Principals and the namespace still come from the
  certificate.
* Values are decoded strictly: at most :data:`MAX_ENCODED` bytes of standard base64, a
  well-formed ``Struct`` (known fields and wire types, valid UTF-8, bounded depth and size),
  ``NAMESPACE`` a string and ``LABELS`` a map of strings.  Anything else is ignored.

Every value ignored is counted in ``meshproxy_peer_metadata_rejected_total{direction, reason}``.
This module is sans-IO: it turns bytes into :class:`~meshproxy.telemetry.metrics.PeerInfo`
and back, and holds a bounded cache of the values it has judged.
"""
from __future__ import annotations

import binascii
import struct as _struct
from typing import Mapping

from .metrics import CLUSTER_ID, PeerInfo, workload_peer

PEER_METADATA = b"x-envoy-peer-metadata"
PEER_METADATA_ID = b"x-envoy-peer-metadata-id"
FIELDS = (PEER_METADATA, PEER_METADATA_ID)

MAX_ENCODED = 8192        # bytes of base64 accepted in one header value
MAX_DEPTH = 8             # nested Struct / ListValue levels
MAX_ITEMS = 512           # map entries and list values in one document
MAX_STRING = 1024         # characters in one key or string value
CACHE_SIZE = 1024         # distinct (value, peer identity) judged and kept

# rejection reasons (the counter's ``reason`` label)
PLAINTEXT = "plaintext"
MALFORMED = "malformed"
TOO_LARGE = "too_large"
NAMESPACE_MISMATCH = "namespace_mismatch"
OVERFLOW = "too_many_peers"      # believed, but the worker labels no more distinct peers
REASONS = (PLAINTEXT, MALFORMED, TOO_LARGE, NAMESPACE_MISMATCH, OVERFLOW)


class MalformedMetadata(ValueError):
    """The bytes are not a Struct this module accepts (the message says why)."""


# ---------------------------------------------------------------- google.protobuf.Struct on the wire
#
# Struct    { map<string, Value> fields = 1; }      (a map entry: key = 1, value = 2)
# Value     { oneof kind { NullValue null_value = 1; double number_value = 2; string string_value = 3;
#                          bool bool_value = 4; Struct struct_value = 5; ListValue list_value = 6; } }
# ListValue { repeated Value values = 1; }

_VARINT, _FIXED64, _LEN = 0, 1, 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _encode_value(value) -> bytes:
    if value is None:
        return _varint(1 << 3 | _VARINT) + b"\x00"
    if isinstance(value, bool):
        return _varint(4 << 3 | _VARINT) + (b"\x01" if value else b"\x00")
    if isinstance(value, (int, float)):
        return _varint(2 << 3 | _FIXED64) + _struct.pack("<d", float(value))
    if isinstance(value, str):
        return _len_field(3, value.encode("utf-8"))
    if isinstance(value, Mapping):
        return _len_field(5, encode_struct(value))
    if isinstance(value, (list, tuple)):
        return _len_field(6, b"".join(_len_field(1, _encode_value(v)) for v in value))
    raise TypeError(f"no Struct value for {type(value).__name__}")


def encode_struct(fields: Mapping) -> bytes:
    """A ``Struct``'s bytes, keys in sorted order (protobuf's deterministic serialization)."""
    return b"".join(_len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, _encode_value(fields[key])))
                    for key in sorted(fields))


class _Reader:
    """Fields of one protobuf message in ``data[start:end]``; every read is bounds-checked."""

    __slots__ = ("data", "pos", "end", "budget")

    def __init__(self, data: bytes, start: int, end: int, budget: list):
        self.data = data
        self.pos = start
        self.end = end
        self.budget = budget             # [items left], shared by the whole document

    def _varint(self) -> int:
        result = shift = 0
        data = self.data
        while True:
            if self.pos >= self.end or shift > 63:
                raise MalformedMetadata("truncated or overlong varint")
            byte = data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    def fields(self):
        """(field number, wire type, payload): an int for varints, (start, end) for
        length-delimited fields, the 8 bytes of a fixed64."""
        while self.pos < self.end:
            key = self._varint()
            number, wire = key >> 3, key & 7
            if number == 0:
                raise MalformedMetadata("field number 0")
            if wire == _VARINT:
                yield number, wire, self._varint()
            elif wire == _FIXED64:
                if self.pos + 8 > self.end:
                    raise MalformedMetadata("truncated fixed64")
                self.pos += 8
                yield number, wire, self.data[self.pos - 8:self.pos]
            elif wire == _LEN:
                length = self._varint()
                if length > self.end - self.pos:
                    raise MalformedMetadata("length past the end of its message")
                start = self.pos
                self.pos += length
                yield number, wire, (start, self.pos)
            else:
                raise MalformedMetadata(f"wire type {wire} (groups, fixed32) in a Struct")

    def text(self, span) -> str:
        raw = self.data[span[0]:span[1]]
        if len(raw) > 4 * MAX_STRING:
            raise MalformedMetadata("string too long")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMetadata("string is not UTF-8") from None
        if len(text) > MAX_STRING:
            raise MalformedMetadata("string too long")
        return text

    def spend(self) -> None:
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise MalformedMetadata(f"more than {MAX_ITEMS} entries")


def _decode_struct(r: _Reader, depth: int) -> dict:
    if depth > MAX_DEPTH:
        raise MalformedMetadata(f"nested deeper than {MAX_DEPTH}")
    out: dict = {}
    for number, wire, span in r.fields():
        if number != 1 or wire != _LEN:
            raise MalformedMetadata(f"Struct field {number} (wire type {wire})")
        r.spend()
        entry = _Reader(r.data, span[0], span[1], r.budget)
        key = value = None
        for n, w, part in entry.fields():
            if n == 1 and w == _LEN and key is None:
                key = entry.text(part)
            elif n == 2 and w == _LEN and value is None:
                value = _decode_value(_Reader(r.data, part[0], part[1], r.budget), depth)
            else:
                raise MalformedMetadata(f"map entry field {n} (wire type {w}), or one repeated")
        if key is None:
            raise MalformedMetadata("map entry without a key")
        if key in out:
            raise MalformedMetadata(f"key {key!r} twice")
        out[key] = value          # (an entry without a value is a null value)
    return out


def _decode_value(r: _Reader, depth: int):
    kinds = 0
    value = None
    for number, wire, part in r.fields():
        kinds += 1
        if kinds > 1:
            raise MalformedMetadata("a Value with more than one kind")
        if number == 1 and wire == _VARINT:
            value = None
        elif number == 2 and wire == _FIXED64:
            value = _struct.unpack("<d", part)[0]
        elif number == 3 and wire == _LEN:
            value = r.text(part)
        elif number == 4 and wire == _VARINT:
            value = bool(part)
        elif number == 5 and wire == _LEN:
            value = _decode_struct(_Reader(r.data, part[0], part[1], r.budget), depth + 1)
        elif number == 6 and wire == _LEN:
            items = _Reader(r.data, part[0], part[1], r.budget)
            value = []
            for n, w, item in items.fields():
                if n != 1 or w != _LEN:
                    raise MalformedMetadata(f"ListValue field {n} (wire type {w})")
                items.spend()
                value.append(_decode_value(_Reader(r.data, item[0], item[1], r.budget), depth + 1))
        else:
            raise MalformedMetadata(f"Value field {number} (wire type {wire})")
    return value


def decode_struct(data: bytes) -> dict:
    """A serialized ``Struct`` as a dict (strings, floats, bools, None, dicts, lists).
    Raises :class:`MalformedMetadata` for anything but a well-formed, bounded Struct."""
    return _decode_struct(_Reader(data, 0, len(data), [MAX_ITEMS]), 1)


# ---------------------------------------------------------------- header values

def encode_header(fields: Mapping) -> bytes:
    """The ``x-envoy-peer-metadata`` value of ``fields``: standard base64, padded."""
    return binascii.b2a_base64(encode_struct(fields), newline=False)


def decode_header(value: bytes) -> dict:
    """The Struct in an ``x-envoy-peer-metadata`` value: standard base64 (padding optional,
    nothing else: no whitespace, no URL-safe alphabet).  Raises :class:`MalformedMetadata`."""
    if len(value) > MAX_ENCODED:
        raise MalformedMetadata("too large")
    if len(value) % 4:
        value += b"=" * (-len(value) % 4)
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedMetadata("not base64") from None
    return decode_struct(data)


def own_metadata(labels: Mapping[str, str], namespace: str, *, node: str = "", service_account: str = "",
                 cluster_id: str = CLUSTER_ID) -> dict:
    """This workload's metadata as Istio's proxies send it (their node metadata): the labels it
    runs with, ``app``/``version`` and the canonical service and revision among them, as
    :func:`~meshproxy.telemetry.metrics.workload_peer` derives them."""
    own = workload_peer(labels, namespace)
    tagged = dict(labels)
    tagged.setdefault("service.istio.io/canonical-name", own.canonical_service)
    tagged.setdefault("service.istio.io/canonical-revision", own.canonical_revision)
    fields: dict = {"NAMESPACE": namespace, "WORKLOAD_NAME": own.workload, "CLUSTER_ID": cluster_id,
                    "LABELS": tagged}
    if node:
        fields["NAME"] = node
    if service_account:
        fields["SERVICE_ACCOUNT"] = service_account
    return fields


def peer_from_metadata(fields: Mapping, principal: str) -> PeerInfo:
    """Istio's labels for a peer from its decoded metadata (``principal``: its verified SPIFFE
    id).  Raises :class:`MalformedMetadata` when the fields Istio reads have the wrong types."""
    namespace = fields.get("NAMESPACE")
    if not isinstance(namespace, str) or not namespace:
        raise MalformedMetadata("NAMESPACE missing or not a string")
    labels = fields.get("LABELS", {})
    if labels is None:
        labels = {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise MalformedMetadata("LABELS is not a map of strings")
    workload = fields.get("WORKLOAD_NAME")
    cluster = fields.get("CLUSTER_ID")
    for name, value in (("WORKLOAD_NAME", workload), ("CLUSTER_ID", cluster)):
        if value is not None and not isinstance(value, str):
            raise MalformedMetadata(f"{name} is not a string")
    peer = workload_peer(labels, namespace, principal=principal)
    return PeerInfo(workload=workload or peer.workload, namespace=namespace, app=peer.app, version=peer.version,
                    canonical_service=peer.canonical_service, canonical_revision=peer.canonical_revision,
                    principal=principal, cluster=cluster or "unknown")


def namespace_of(spiffe_id: str) -> str:
    """The namespace a workload SPIFFE id names (``spiffe://TD/ns/NS/sa/SA``), or ""."""
    parts = spiffe_id.split("/")
    if len(parts) == 7 and parts[0] == "spiffe:" and parts[1] == "" and parts[3] == "ns" and parts[5] == "sa":
        return parts[4]
    return ""


class PeerMetadataExchange:
    """One worker's side of the exchange: its own encoded metadata (made once; it changes only
    with the proxy's own labels) and the judgement of what peers send.

    ``request_block``: the two header lines a request to a mesh peer carries (appended to a
    head that is already encoded); ``response_fields``: the two fields a response carries.
    :meth:`judge` turns a received value into a :class:`PeerInfo` or a rejection reason,
    cached per (value, peer identity); :meth:`rejected` counts one ignored value."""

    def __init__(self, fields: Mapping | None, node_id: str = ""):
        self.fields = dict(fields) if fields is not None else None
        if fields is None:             # a proxy that is no workload: it judges, and sends nothing
            self.request_block = b""
            self.response_fields = None
        else:
            value = encode_header(fields)
            node = bytes(c for c in node_id.encode("ascii", "replace") if 0x21 <= c <= 0x7E) or b"unknown"
            self.request_block = b"%s: %s\r\n%s: %s\r\n" % (PEER_METADATA_ID, node, PEER_METADATA, value)
            self.response_fields = ((PEER_METADATA_ID, node), (PEER_METADATA, value))
        self._judged: dict[tuple[bytes, str], PeerInfo | str] = {}
        self._rejected: dict[tuple[str, str], int] = {}

    def judge(self, value: bytes, spiffe_id: str) -> PeerInfo | str:
        """The peer a metadata ``value`` describes, received on a connection whose verified
        peer is ``spiffe_id`` ("" for plaintext), or the reason it is not believed."""
        if not spiffe_id:
            return PLAINTEXT
        key = (value, spiffe_id)
        verdict = self._judged.get(key)
        if verdict is None:
            verdict = self._judge(value, spiffe_id)
            judged = self._judged
            if len(judged) >= CACHE_SIZE:            # the oldest quarter goes (as Istio's cache)
                for old in list(judged)[:CACHE_SIZE // 4]:
                    del judged[old]
            judged[key] = verdict
        return verdict

    @staticmethod
    def _judge(value: bytes, spiffe_id: str) -> PeerInfo | str:
        if len(value) > MAX_ENCODED:
            return TOO_LARGE
        try:
            peer = peer_from_metadata(decode_header(value), spiffe_id)
        except MalformedMetadata:
            return MALFORMED
        if peer.namespace != namespace_of(spiffe_id):
            return NAMESPACE_MISMATCH
        return peer

    def rejected(self, direction: str, reason: str) -> None:
        key = (direction, reason)
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def counters(self):
        """CounterSource for ProxyMetrics.attach (every reason at 0 from the start)."""
        out = []
        for direction in ("request", "response"):
            for reason in REASONS:
                out.append(("meshproxy_peer_metadata_rejected_total", (direction, reason),
                            self._rejected.get((direction, reason), 0)))
        return out


def metadata_value(head) -> bytes | None:
    """The ``x-envoy-peer-metadata`` value of a request or response head: None without one,
    ``b""`` (malformed) when it occurs more than once."""
    names = head.names or tuple([n for n, _ in head.headers])
    if PEER_METADATA not in names:
        return None
    if names.count(PEER_METADATA) > 1:
        return b""
    return head.headers[names.index(PEER_METADATA)][1]
