"""Propagation is always on: W3C trace-context, B3 single and multi, x-request-id."""
from __future__ import annotations

import random
import uuid

import pytest

from meshproxy.telemetry.tracing import PROPAGATION_HEADERS, ProxyTracer

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"


def tracer(rate: float = 0.01, seed: int = 7) -> ProxyTracer:
    return ProxyTracer(None, sample_rate=rate, rng=random.Random(seed))


def fwd(ctx) -> dict[bytes, bytes]:
    out = dict(ctx.headers_to_forward)
    assert len(out) == len(ctx.headers_to_forward), "a propagation header is set twice"
    return out


def test_w3c_sampled_parent_is_followed_and_forwarded_with_new_span_as_parent():
    ctx = tracer(rate=0.0).start([(b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01"),
                                  (b"tracestate", b"congo=t61rcWkgMzE")], "server")
    assert ctx.sampled and ctx.trace_id == TRACE and ctx.parent_id == PARENT
    assert len(ctx.span_id) == 16 and ctx.span_id != PARENT
    h = fwd(ctx)
    assert h[b"traceparent"] == b"00-" + TRACE + b"-" + ctx.span_id + b"-01"
    assert h[b"tracestate"] == b"congo=t61rcWkgMzE"
    assert h[b"b3"] == TRACE + b"-" + ctx.span_id + b"-1-" + PARENT
    assert (h[b"x-b3-traceid"], h[b"x-b3-spanid"], h[b"x-b3-parentspanid"], h[b"x-b3-sampled"]) == (
        TRACE, ctx.span_id, PARENT, b"1")


def test_unsampled_parent_stays_unsampled_but_is_still_propagated_in_every_format():
    ctx = tracer(rate=1.0).start([(b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-00")], "server")
    assert not ctx.sampled
    h = fwd(ctx)
    assert h[b"traceparent"] == b"00-" + TRACE + b"-" + ctx.span_id + b"-00"
    assert h[b"b3"] == TRACE + b"-" + ctx.span_id + b"-0-" + PARENT
    assert h[b"x-b3-sampled"] == b"0" and h[b"x-b3-traceid"] == TRACE


def test_new_unsampled_trace_is_propagated_with_fresh_ids_and_request_id():
    ctx = tracer(rate=0.0).start([], "client")
    h = fwd(ctx)
    assert not ctx.sampled and ctx.parent_id == b""
    assert h[b"traceparent"] == b"00-" + ctx.trace_id + b"-" + ctx.span_id + b"-00"
    assert b"x-b3-parentspanid" not in h
    assert uuid.UUID(h[b"x-request-id"].decode()).version == 4
    assert set(h) <= PROPAGATION_HEADERS


def test_x_request_id_is_kept_as_received():
    ctx = tracer().start([(b"x-request-id", b"abc-123")], "server")
    assert ctx.request_id == b"abc-123" and fwd(ctx)[b"x-request-id"] == b"abc-123"


@pytest.mark.parametrize("bad", [
    b"00-00000000000000000000000000000000-" + PARENT + b"-01",      # all-zero trace id
    b"00-" + TRACE + b"-0000000000000000-01",                        # all-zero span id
    b"ff-" + TRACE + b"-" + PARENT + b"-01",                         # forbidden version
    b"00-" + TRACE.upper() + b"-" + PARENT + b"-01",                 # upper-case hex
    b"00-" + TRACE + b"-" + PARENT + b"-01-extra",                   # version 00 has no extra fields
    b"garbage",
])
def test_invalid_traceparent_is_ignored_and_a_new_trace_starts(bad):
    ctx = tracer(rate=0.0).start([(b"traceparent", bad)], "server")
    assert ctx.trace_id != TRACE and ctx.parent_id == b"" and not ctx.sampled


def test_b3_single_header_with_64_bit_trace_id_is_padded_to_128_bits():
    ctx = tracer(rate=0.0).start([(b"b3", b"a3ce929d0e0e4736-" + PARENT + b"-1")], "server")
    assert ctx.sampled and ctx.trace_id == b"0000000000000000a3ce929d0e0e4736" and ctx.parent_id == PARENT
    assert fwd(ctx)[b"traceparent"].startswith(b"00-0000000000000000a3ce929d0e0e4736-")


def test_b3_single_deny_only_header_keeps_the_new_trace_unsampled():
    ctx = tracer(rate=1.0).start([(b"b3", b"0")], "server")
    assert not ctx.sampled and ctx.parent_id == b""


def test_b3_single_debug_forces_sampling_and_is_forwarded_as_debug():
    ctx = tracer(rate=0.0).start([(b"b3", TRACE + b"-" + PARENT + b"-d")], "server")
    h = fwd(ctx)
    assert ctx.sampled and ctx.debug
    assert h[b"b3"].split(b"-")[2] == b"d" and h[b"x-b3-flags"] == b"1" and b"x-b3-sampled" not in h


def test_b3_multi_headers_are_read_and_forwarded():
    ctx = tracer(rate=0.0).start([(b"x-b3-traceid", TRACE), (b"x-b3-spanid", PARENT),
                                  (b"x-b3-sampled", b"1")], "server")
    assert ctx.sampled and ctx.trace_id == TRACE and ctx.parent_id == PARENT
    assert fwd(ctx)[b"x-b3-parentspanid"] == PARENT


def test_b3_multi_without_sampling_decision_uses_the_local_rate():
    ctx = tracer(rate=1.0).start([(b"x-b3-traceid", TRACE), (b"x-b3-spanid", PARENT)], "server")
    assert ctx.sampled and ctx.trace_id == TRACE


def test_w3c_wins_over_b3_when_both_are_present():
    ctx = tracer().start([(b"b3", b"a3ce929d0e0e4736-" + PARENT + b"-0"),
                          (b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01")], "server")
    assert ctx.trace_id == TRACE and ctx.sampled


def test_x_client_trace_id_forces_sampling_even_under_an_unsampled_parent():
    ctx = tracer(rate=0.0).start([(b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-00"),
                                  (b"x-client-trace-id", b"debug-me")], "server")
    assert ctx.sampled and fwd(ctx)[b"traceparent"].endswith(b"-01")


def test_new_traces_are_sampled_at_the_configured_rate():
    t = tracer(rate=0.01, seed=3)
    sampled = sum(t.start([], "server").sampled for _ in range(20000))
    assert 100 <= sampled <= 300          # 1% of 20000 = 200; binomial sd ~14


def test_b3_formats_can_be_turned_off():
    t = ProxyTracer(None, rng=random.Random(1), b3_single=False, b3_multi=False)
    assert set(fwd(t.start([], "server"))) == {b"traceparent", b"x-request-id"}


def test_sample_rate_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="sample_rate"):
        ProxyTracer(None, sample_rate=1.5)


def test_generated_request_ids_are_rfc_4122_version_4_uuids():
    from meshproxy.telemetry.tracing import random_uuid
    rng = random.Random(7)
    ids = {random_uuid(rng) for _ in range(2000)}
    assert len(ids) == 2000
    for value in ids:
        parsed = uuid.UUID(value.decode())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed).encode() == value


def test_new_trace_and_span_ids_are_hex_of_the_right_length_and_never_zero():
    tracer = ProxyTracer(None, sample_rate=0.0, rng=random.Random(3))
    for _ in range(500):
        ctx = tracer.start([(b"host", b"a")], "server")
        assert len(ctx.trace_id) == 32 and int(ctx.trace_id, 16) != 0
        assert len(ctx.span_id) == 16 and int(ctx.span_id, 16) != 0


@pytest.mark.parametrize("b3_single", [True, False])
@pytest.mark.parametrize("b3_multi", [True, False])
@pytest.mark.parametrize("incoming", [
    [],                                                                                   # a new trace
    [(b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01"), (b"tracestate", b"congo=t61rcWkgMzE")],
    [(b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-00"), (b"x-request-id", b"kept-id")],
    [(b"b3", TRACE + b"-" + PARENT + b"-d")],                                             # debug
    [(b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01"), (b"tracestate", b"k=" + b"v" * 700),
     (b"x-request-id", b"r" * 300)],                                                   # longer than the C buffer path
])
def test_the_encoded_propagation_lines_are_exactly_the_forwarded_fields(b3_single, b3_multi, incoming):
    """The request head carries ``forward_block()`` (compiled: C copies into a stack buffer, or
    a join when the ids and state are long); header operations and mirrors use
    ``headers_to_forward``.  Both must say the same, field for field, in the same order."""
    t = ProxyTracer(None, sample_rate=0.5, rng=random.Random(3), b3_single=b3_single, b3_multi=b3_multi)
    for _ in range(8):                                       # sampled and unsampled new traces
        ctx = t.start(incoming, "server")
        assert ctx.forward_block() == b"".join(n + b": " + v + b"\r\n" for n, v in ctx.headers_to_forward)
