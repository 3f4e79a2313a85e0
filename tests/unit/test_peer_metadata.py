"""Istio's peer metadata values (x-envoy-peer-metadata): the Struct codec against the protobuf
reference implementation, strict decoding of untrusted bytes, and who is believed."""
from __future__ import annotations

import base64

import pytest
from google.protobuf import struct_pb2

from meshproxy.codec.api import RequestHead
from meshproxy.telemetry.peer_metadata import (
    CACHE_SIZE, MALFORMED, NAMESPACE_MISMATCH, PLAINTEXT, TOO_LARGE, MalformedMetadata, PeerMetadataExchange,
    decode_header, decode_struct, encode_header, encode_struct, metadata_value, namespace_of, own_metadata,
)

FOO_SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"


def _pb(fields: dict) -> bytes:
    message = struct_pb2.Struct()
    message.update(fields)
    return message.SerializeToString()


def _from_pb(data: bytes) -> dict:
    message = struct_pb2.Struct()
    message.ParseFromString(data)
    return {k: _plain(v) for k, v in message.items()}


def _plain(value):
    if isinstance(value, struct_pb2.Struct):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [_plain(v) for v in value]
    return value


DOCUMENTS = [
    {},
    {"NAMESPACE": "foo"},
    {"LABELS": {"app": "reviews", "version": "v2", "é": "ünïcode"}, "NAMESPACE": "foo", "WORKLOAD_NAME": "reviews-v2"},
    {"a": None, "b": True, "c": False, "d": 1.5, "e": -3.0, "f": [1.0, "x", None, {"g": [True]}], "h": {}},
    {"NAME": "x" * 300},
]


@pytest.mark.parametrize("fields", DOCUMENTS)
def test_struct_codec_agrees_with_protobuf(fields):
    assert decode_struct(_pb(fields)) == fields           # what protobuf writes, we read
    assert _from_pb(encode_struct(fields)) == fields      # what we write, protobuf reads


def test_encoding_is_deterministic_with_sorted_keys():
    one = encode_struct({"b": "1", "a": {"y": "2", "x": "3"}})
    two = encode_struct({"a": {"x": "3", "y": "2"}, "b": "1"})
    assert one == two and one.index(b"\x0a\x01a") < one.index(b"\x0a\x01b")


def test_own_metadata_carries_istio_fields_and_canonical_labels():
    fields = own_metadata({"app": "reviews", "version": "v2"}, "bookinfo", node="reviews-v2-pod",
                          service_account="bookinfo-reviews")
    assert fields == {
        "NAMESPACE": "bookinfo", "WORKLOAD_NAME": "reviews-v2", "CLUSTER_ID": "Kubernetes", "NAME": "reviews-v2-pod",
        "SERVICE_ACCOUNT": "bookinfo-reviews",
        "LABELS": {"app": "reviews", "version": "v2", "service.istio.io/canonical-name": "reviews",
                   "service.istio.io/canonical-revision": "v2"}}
    # the header value is standard base64 of the Struct, and reads back
    value = encode_header(fields)
    assert _from_pb(base64.b64decode(value)) == fields
    assert decode_header(value) == fields
    assert decode_header(value.rstrip(b"=")) == fields    # padding optional, as Envoy decodes


@pytest.mark.parametrize("data, why", [
    (b"\x0a", "truncated or overlong varint"),
    (b"\x0a\x05\x0a\x01a", "length past the end"),
    (b"\x12\x00", "Struct field 2"),
    (b"\x0d\x00\x00\x00\x00", "wire type 5"),
    (b"\x0b", "wire type 3"),
    (b"\x0a\x02\x12\x00", "without a key"),
    (b"\x0a\x05\x0a\x01\xff\x12\x00", "not UTF-8"),
    (_pb({"a": "x"}) * 2, "twice"),
    (b"\x0a\x0a\x0a\x01a\x12\x05\x1a\x01x\x20\x01", "more than one kind"),
    (b"\x0a\x07\x0a\x01a\x12\x02\x38\x00", "Value field 7"),
    (b"\x0a\x03\x12\x01\x00", "field number 0"),
    (b"\x0a\x01" + bytes([0x80] * 11), "varint"),
])
def test_malformed_structs_are_refused(data, why):
    with pytest.raises(MalformedMetadata, match=why):
        decode_struct(data)


def test_nesting_and_size_are_bounded():
    deep: dict = {"x": "y"}
    for _ in range(10):
        deep = {"n": deep}
    with pytest.raises(MalformedMetadata, match="deeper"):
        decode_struct(encode_struct(deep))
    with pytest.raises(MalformedMetadata, match="entries"):
        decode_struct(encode_struct({f"k{i}": "v" for i in range(600)}))
    with pytest.raises(MalformedMetadata, match="too long"):
        decode_struct(encode_struct({"k": "v" * 2000}))
    with pytest.raises(MalformedMetadata, match="too large"):
        decode_header(b"A" * 9000)


@pytest.mark.parametrize("value", [
    b"!!!!",
    b"AAA=A===",                                                   # data after padding
    encode_header({"NAMESPACE": "foo"}).rstrip(b"=") + b" ",       # whitespace
    b"-_8=",                                                       # the URL-safe alphabet
    b"AAAAA",                                                      # a length no base64 has
])
def test_header_values_are_strict_base64(value):
    with pytest.raises(MalformedMetadata):
        decode_header(value)


def test_metadata_is_believed_only_over_mtls_from_the_namespace_it_names():
    exchange = PeerMetadataExchange(own_metadata({"app": "x"}, "bar"), "sidecar~x.bar")
    value = encode_header(own_metadata({"app": "sleep", "version": "v1"}, "foo"))
    peer = exchange.judge(value, FOO_SLEEP)
    assert (peer.workload, peer.namespace, peer.app, peer.version, peer.canonical_service, peer.canonical_revision,
            peer.principal, peer.cluster) == ("sleep-v1", "foo", "sleep", "v1", "sleep", "v1", FOO_SLEEP,
                                              "Kubernetes")
    assert exchange.judge(value, "") == PLAINTEXT
    assert exchange.judge(value, "spiffe://cluster.local/ns/bar/sa/sleep") == NAMESPACE_MISMATCH
    assert exchange.judge(b"garbage!", FOO_SLEEP) == MALFORMED
    assert exchange.judge(b"A" * 9000, FOO_SLEEP) == TOO_LARGE
    for wrong in ({"LABELS": {"app": "x"}}, {"NAMESPACE": 3.0}, {"NAMESPACE": "foo", "LABELS": {"app": 1.0}},
                  {"NAMESPACE": "foo", "LABELS": "app=x"}, {"NAMESPACE": "foo", "WORKLOAD_NAME": True}):
        assert exchange.judge(encode_header(wrong), FOO_SLEEP) == MALFORMED, wrong
    exchange.rejected("request", MALFORMED)
    counts = {labels: n for _, labels, n in exchange.counters()}
    assert counts[("request", MALFORMED)] == 1 and counts[("response", PLAINTEXT)] == 0


def test_judgements_are_cached_in_bounded_space():
    exchange = PeerMetadataExchange(None)
    assert exchange.request_block == b"" and exchange.response_fields is None
    for i in range(CACHE_SIZE * 2):
        exchange.judge(encode_header({"NAMESPACE": "foo", "NAME": str(i)}), FOO_SLEEP)
    assert len(exchange._judged) <= CACHE_SIZE


def test_the_encoded_header_is_made_once_with_a_clean_node_id():
    exchange = PeerMetadataExchange(own_metadata({}, "foo"), "sidecar~pod\r\nx: y.foo")
    assert exchange.request_block.count(b"\r\n") == 2
    assert exchange.response_fields[0] == (b"x-envoy-peer-metadata-id", b"sidecar~podx:y.foo")
    assert exchange.request_block.endswith(b"x-envoy-peer-metadata: " + exchange.response_fields[1][1] + b"\r\n")


def test_reading_the_value_from_a_head():
    def head(*fields):
        return RequestHead(b"GET", b"/", b"1.1", list(fields), b"h", b"/", 0, -1, True, b"", False)
    assert metadata_value(head((b"host", b"h"))) is None
    assert metadata_value(head((b"x-envoy-peer-metadata", b"abc"))) == b"abc"
    assert metadata_value(head((b"x-envoy-peer-metadata", b"a"), (b"x-envoy-peer-metadata", b"b"))) == b""


def test_namespace_of_a_spiffe_id():
    assert namespace_of(FOO_SLEEP) == "foo"
    assert namespace_of("spiffe://td/ns/foo/sa/x/extra") == ""
    assert namespace_of("") == ""
