"""Trace propagation (always) and spans (only for sampled requests).

On the request path the worker calls :meth:`ProxyTracer.start` with the request head
and gets a :class:`TraceContext`: the trace id, this hop's new span id, the sampling
decision and this hop's propagation fields (W3C ``traceparent``/``tracestate``, B3 single
and multi, ``x-request-id``) to put on the upstream request after removing the incoming
copies (:data:`PROPAGATION_HEADERS`): ``forward_block()`` as encoded header lines for the
request head, ``headers_to_forward`` as fields where header operations or mirrors need
them.  :meth:`ProxyTracer.finish` records an
OpenTelemetry span only when the context is sampled; unsampled requests never create
SDK objects.

Sampling is parent-based: a valid incoming W3C or B3 sampling decision is followed; a
new trace is sampled with probability ``sample_rate`` (decided on the trace id, like
OTel's TraceIdRatioBased); ``x-client-trace-id``, ``x-envoy-force-trace`` and B3 debug
force sampling, as in Envoy.

Export lives in :mod:`meshproxy.telemetry.trace_export`, imported only when an exporter
is configured: a proxy that only propagates never loads the OpenTelemetry SDK.
"""
from __future__ import annotations

import os
import random
import re
import time

import cython
from typing import TYPE_CHECKING, Callable, Sequence

from ..codec.api import name_set

if TYPE_CHECKING:   # the OpenTelemetry SDK is imported only when spans are exported
    from .trace_export import PresetIdGenerator, TraceExport

Headers = Sequence[tuple[bytes, bytes]]

# Incoming copies of these must be removed before adding this hop's (``ctx.forward_block()``).
PROPAGATION_HEADERS = name_set({
    b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
    b"x-b3-sampled", b"x-b3-flags", b"x-request-id",
})
_READ = name_set(PROPAGATION_HEADERS | {b"x-client-trace-id", b"x-envoy-force-trace"})
_HEXDIGITS = b"0123456789abcdef"
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
_MASK64 = (1 << 64) - 1
_U64 = 0xFFFFFFFFFFFFFFFF                      # the same mask, a C constant when compiled
# UUID version 4 (bits 76-79 = 0100) and RFC 4122 variant (bits 62-63 = 10)
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_V4 = (0x4 << 76) | (0x2 << 62)
_MASK128 = (1 << 128) - 1
_NEW_IDS_CLEAR = ~(~_UUID_CLEAR << 192)
_NEW_IDS_UUID_V4 = _UUID_V4 << 192


def _is_hex(value: bytes, lengths: tuple[int, ...]) -> bool:
    """Lower-case hex of an allowed length and not all zeros."""
    return len(value) in lengths and not value.translate(None, _HEXDIGITS) and value.strip(b"0") != b""


# ---------------------------------------------------------------------- context

def random_uuid(rng) -> bytes:
    """A random (version 4) UUID from ``rng`` (no syscall), like Envoy's x-request-id."""
    if cython.compiled:
        if type(rng) is IdSource:              # 128 bits from its C state, no Python int
            cython.cast(IdSource, rng)._fill(buf, 2)
            return _uuid_text(buf)
        raw = rng.getrandbits(128).to_bytes(16, "big")
        return _uuid_text(raw)
    h = b"%032x" % (rng.getrandbits(128) & _UUID_CLEAR | _UUID_V4)
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


class IdSource:
    """The default source of new ids: xoshiro256** (Blackman and Vigna, 2018), 256 bits of
    state seeded from ``os.urandom`` when each ProxyTracer is built (in each worker, after
    fork).  Trace and request ids need uniqueness, not secrecy; Envoy draws them from a
    seeded mt19937_64 the same way.  It offers ``getrandbits`` like ``random.Random`` (the
    tracer's rng contract), and compiled, a new trace's 320 bits go from the C state into
    the ids without becoming a Python int (``_new_ids``)."""

    def __init__(self, seed: bytes | None = None):
        s = seed if seed is not None else os.urandom(32)
        if len(s) != 32:
            raise ValueError(f"an IdSource seed is 32 bytes, got {len(s)}")
        self._s0 = int.from_bytes(s[0:8], "little")
        self._s1 = int.from_bytes(s[8:16], "little")
        self._s2 = int.from_bytes(s[16:24], "little")
        self._s3 = int.from_bytes(s[24:32], "little")
        if not (self._s0 | self._s1 | self._s2 | self._s3):
            self._s0 = 1                       # the one state xoshiro never leaves

    def next64(self) -> int:
        """The next 64 random bits."""
        s0, s1, s2, s3 = self._s0, self._s1, self._s2, self._s3
        x = s1 * 5 & _U64
        result = ((x << 7 | x >> 57) & _U64) * 9 & _U64
        t = s1 << 17 & _U64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        self._s0, self._s1, self._s2, self._s3 = s0, s1, s2, (s3 << 45 | s3 >> 19) & _U64
        return result

    def getrandbits(self, k: int) -> int:
        """``k`` random bits: the top ``k`` of ``ceil(k / 64)`` draws, the first draw most
        significant."""
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        words = (k + 63) // 64
        r = 0
        for _ in range(words):
            r = r << 64 | self.next64()
        return r >> (64 * words - k)

    def _fill(self, out, words: int) -> None:
        """``words`` draws into ``out`` big-endian, the bytes of ``getrandbits(64 * words)``
        (compiled only)."""
        for i in range(words):
            v = htobe64(self.next64())        # the word's bytes, most significant first
            memcpy(out + 8 * i, cython.address(v), 8)


def _new_ids(rng):
    """A new trace's ids from one 320-bit draw: ``(x-request-id (a UUIDv4, the top 128 bits),
    trace id (the next 128), span id (the low 64), the trace id's low 64 bits as an int)``."""
    if cython.compiled:
        if type(rng) is IdSource:            # the default: no Python int in between
            r = None
            cython.cast(IdSource, rng)._fill(buf, 5)
        else:
            r = rng.getrandbits(320)
            raw = r.to_bytes(40, "big")      # the same bits, most significant byte first
            memcpy(buf, PyBytes_AS_STRING(raw), 40)
        p = buf
        memcpy(cython.address(high), p + 16, 8)    # the trace id's two words and the span id,
        memcpy(cython.address(low), p + 24, 8)     # as stored (big-endian)
        memcpy(cython.address(span_bits), p + 32, 8)
        if (high | low) and span_bits:       # else: the reference below makes them valid
            return _uuid_text(p), _hex_text(p, 16, 32), _hex_text(p, 32, 40), be64toh(low)
        if r is None:
            r = int.from_bytes(cython.cast(cython.p_char, p)[:40], "big")
    else:
        r = rng.getrandbits(320)
    r = r & _NEW_IDS_CLEAR | _NEW_IDS_UUID_V4
    if not (r >> 64) & _MASK128 or not r & _MASK64:
        r |= (1 << 64) | 1                   # all-zero ids are invalid (W3C)
    ids = b"%080x" % r
    request_id = b"-".join((ids[:8], ids[8:12], ids[12:16], ids[16:20], ids[20:32]))
    return request_id, ids[32:64], ids[64:], (r >> 64) & _MASK64


def _put_hex(w, p, start: int, end: int):
    """Write bytes ``p[start:end]`` as lower-case hex at ``w``; return the position after
    them (compiled only: one two-byte copy from _HEX_PAIRS per byte)."""
    for i in range(start, end):
        memcpy(w, cython.address(_HEX_PAIRS[p[i]]), 2)
        w += 2
    return w


if cython.compiled:
    for _byte in range(256):                    # the two hex digits of each byte value, in memory order
        _pair = cython.cast(cython.p_char, cython.address(_HEX_PAIRS[_byte]))
        _pair[0] = _HEXDIGITS[_byte >> 4]
        _pair[1] = _HEXDIGITS[_byte & 15]


def _hex_text(raw, start: int, end: int) -> bytes:
    """``raw[start:end]`` in lower-case hex (compiled only)."""
    out = PyBytes_FromStringAndSize(cython.NULL, 2 * (end - start))
    _put_hex(PyBytes_AS_STRING(out), raw, start, end)
    return out


def _uuid_text(raw) -> bytes:
    """The text of a version 4 UUID from the first 16 random bytes of ``raw`` (compiled only):
    version 0100 and variant 10 set, 8-4-4-4-12 hex digits."""
    p = raw
    out = PyBytes_FromStringAndSize(cython.NULL, 36)
    w = _put_hex(PyBytes_AS_STRING(out), p, 0, 4)
    w[0] = 45                                  # "-"
    w = _put_hex(w + 1, p, 4, 6)
    w[0] = 45
    w[1] = 52                                  # "4": the version
    w[2] = _HEXDIGITS[p[6] & 15]
    w = _put_hex(w + 3, p, 7, 8)
    w[0] = 45
    w[1] = _HEXDIGITS[8 | (p[8] >> 4) & 3]     # the variant: 10xx
    w[2] = _HEXDIGITS[p[8] & 15]
    w = _put_hex(w + 3, p, 9, 10)
    w[0] = 45
    _put_hex(w + 1, p, 10, 16)
    return out


class TraceContext:
    """One hop of one request.  ``span_id`` is this proxy's span (client or server).

    The span's request attributes (from ``start_ns``) are set only on sampled contexts."""
    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "debug", "kind", "request_id", "tracestate",
                 "b3_single", "b3_multi", "start_ns", "method", "path", "authority", "user_agent", "scheme",
                 "peer_address")

    def __init__(self, trace_id: bytes, span_id: bytes, parent_id: bytes, sampled: bool, debug: bool,
                 kind: str, request_id: bytes, tracestate: bytes, b3_single: bool = True, b3_multi: bool = True):
        self.trace_id = trace_id          # 32 lower-case hex digits
        self.span_id = span_id            # 16 lower-case hex digits
        self.parent_id = parent_id        # 16 hex digits, b"" for a new trace
        self.sampled = sampled
        self.debug = debug
        self.kind = kind
        self.request_id = request_id
        self.tracestate = tracestate
        self.b3_single = b3_single        # which B3 forms are propagated
        self.b3_multi = b3_multi
        self.start_ns = 0
        self.method = self.path = self.authority = self.user_agent = b""
        self.scheme = "http"
        self.peer_address = ""

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.decode()

    @property
    def headers_to_forward(self) -> list:
        """This hop's propagation fields, ``x-request-id`` included, as ``(name, value)``: they
        replace the incoming copies (:data:`PROPAGATION_HEADERS`)."""
        trace, span, parent, debug = self.trace_id, self.span_id, self.parent_id, self.debug
        flag, b3_sampled = (b"01", b"1") if self.sampled else (b"00", b"0")
        fwd = [(b"traceparent", b"-".join((b"00", trace, span, flag))), (b"x-request-id", self.request_id)]
        if self.tracestate:
            fwd.append((b"tracestate", self.tracestate))
        if self.b3_single:
            b3s = b"d" if debug else b3_sampled
            fwd.append((b"b3", b"-".join((trace, span, b3s, parent) if parent else (trace, span, b3s))))
        if self.b3_multi:
            last = (b"x-b3-flags", b"1") if debug else (b"x-b3-sampled", b3_sampled)
            if parent:
                fwd += ((b"x-b3-traceid", trace), (b"x-b3-spanid", span), (b"x-b3-parentspanid", parent), last)
            else:
                fwd += ((b"x-b3-traceid", trace), (b"x-b3-spanid", span), last)
        return fwd

    def forward_block(self) -> bytes:
        """The same fields, in the same order, as header lines (``name: value CRLF`` each) for
        the request head: no tuple per field and no join per value."""
        trace, span, parent, debug = self.trace_id, self.span_id, self.parent_id, self.debug
        if cython.compiled:
            if len(trace) + len(span) + len(parent) + len(self.request_id) + len(self.tracestate) <= 600:
                return _forward_lines(self)
        parts = [b"traceparent: 00-", trace, b"-", span, b"-01\r\nx-request-id: " if self.sampled
                 else b"-00\r\nx-request-id: ", self.request_id, b"\r\n"]
        if self.tracestate:
            parts += (b"tracestate: ", self.tracestate, b"\r\n")
        if self.b3_single:
            parts += (b"b3: ", trace, b"-", span, b"-d" if debug else b"-1" if self.sampled else b"-0")
            if parent:
                parts += (b"-", parent)
            parts.append(b"\r\n")
        if self.b3_multi:
            parts += (b"x-b3-traceid: ", trace, b"\r\nx-b3-spanid: ", span, b"\r\n")
            if parent:
                parts += (b"x-b3-parentspanid: ", parent, b"\r\n")
            parts.append(b"x-b3-flags: 1\r\n" if debug else b"x-b3-sampled: 1\r\n" if self.sampled
                         else b"x-b3-sampled: 0\r\n")
        return b"".join(parts)


def _put(w, data: bytes):
    """Copy ``data`` to ``w``; return the position after it (compiled only)."""
    n = len(data)
    memcpy(w, cython.cast(cython.p_const_char, data), n)
    return w + n


def _forward_lines(ctx: TraceContext) -> bytes:
    """:meth:`TraceContext.forward_block` written into a stack buffer by C copies (compiled
    only; the caller checked that the variable parts fit: at most 600 bytes of ids and state
    besides about 200 of names and separators)."""
    trace, span, parent = ctx.trace_id, ctx.span_id, ctx.parent_id
    sampled = ctx.sampled
    w = _put(_put(_put(_put(buf, b"traceparent: 00-"), trace), b"-"), span)
    w = _put(_put(_put(w, b"-01\r\nx-request-id: " if sampled else b"-00\r\nx-request-id: "), ctx.request_id),
             b"\r\n")
    if ctx.tracestate:
        w = _put(_put(_put(w, b"tracestate: "), ctx.tracestate), b"\r\n")
    if ctx.b3_single:
        w = _put(_put(_put(_put(w, b"b3: "), trace), b"-"), span)
        w = _put(w, b"-d" if ctx.debug else b"-1" if sampled else b"-0")
        if parent:
            w = _put(_put(w, b"-"), parent)
        w = _put(w, b"\r\n")
    if ctx.b3_multi:
        w = _put(_put(_put(_put(_put(w, b"x-b3-traceid: "), trace), b"\r\nx-b3-spanid: "), span), b"\r\n")
        if parent:
            w = _put(_put(_put(w, b"x-b3-parentspanid: "), parent), b"\r\n")
        w = _put(w, b"x-b3-flags: 1\r\n" if ctx.debug else b"x-b3-sampled: 1\r\n" if sampled
                 else b"x-b3-sampled: 0\r\n")
    return PyBytes_FromStringAndSize(buf, w - buf)


def _reads_any(names: tuple) -> bool:
    """Whether a head with these field names carries a field :meth:`ProxyTracer.start` reads
    (compiled: a C loop of set lookups instead of ``isdisjoint``'s method call)."""
    if cython.compiled:
        for name in names:
            if name in _READ:
                return True
        return False
    return not _READ.isdisjoint(names)


def _parse_traceparent(value: bytes):
    """-> (trace_id, parent_span_id, sampled) or None when invalid (W3C trace-context)."""
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return trace, span, flags[1] in b"13579bdf"


def _b3_trace(value: bytes) -> bytes | None:
    value = value.lower()
    if _is_hex(value, (16, 32)):
        return value.rjust(32, b"0")
    return None


def _parse_b3_single(value: bytes):
    """-> (trace_id|None, span_id|None, sampled|None, debug) or None when invalid."""
    value = value.strip().lower()
    if value in (b"0", b"1", b"d"):
        return None, None, value != b"0", value == b"d"
    parts = value.split(b"-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace = _b3_trace(parts[0])
    span = parts[1] if _is_hex(parts[1], (16,)) else None
    if trace is None or span is None:
        return None
    sampled, debug = None, False
    if len(parts) >= 3:
        if parts[2] not in (b"0", b"1", b"d"):
            return None
        sampled, debug = parts[2] != b"0", parts[2] == b"d"
    return trace, span, sampled, debug


# ---------------------------------------------------------------------- the tracer



class ProxyTracer:
    """Per-worker propagation and span recording.

    ``export`` None means propagate only (sampling decisions are still made and
    forwarded, nothing is recorded).  ``rng`` makes new ids and the sampling draw;
    ``clock_ns`` gives span timestamps (Unix ns).
    """

    def __init__(self, export: TraceExport | None, *, sample_rate: float = 0.01,
                 rng: random.Random | None = None, clock_ns: Callable[[], int] = time.time_ns,
                 b3_single: bool = True, b3_multi: bool = True, instrumentation_name: str = "meshproxy"):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {sample_rate}")
        self.export = export
        self.sample_rate = sample_rate
        self._bound = int(sample_rate * (1 << 64))
        # default: IdSource when compiled (its C state fills the ids); pure Python, the
        # C-implemented Mersenne Twister is the faster of the two
        self._rng = rng if rng is not None else IdSource() if cython.compiled else random.Random()
        self._clock_ns = clock_ns
        self.b3_single = b3_single
        self.b3_multi = b3_multi
        self._tracer = None
        self._ids: PresetIdGenerator | None = None
        self._record = None
        if export is not None:
            from .trace_export import PresetIdGenerator, record_span
            self._record = record_span
            ids = export.provider.id_generator
            if not isinstance(ids, PresetIdGenerator):
                raise ValueError("the TracerProvider must use PresetIdGenerator (build it with build_trace_export)")
            self._ids = ids
            self._tracer = export.provider.get_tracer(instrumentation_name)

    # ---------------------------------------------------------------- request path

    def start(self, head_headers: Headers, kind: str = "server", method: bytes = b"", path: bytes = b"",
              authority: bytes = b"", scheme: str = "http", peer_address: str = "",
              names: tuple | None = None) -> TraceContext:
        # Runs for every request: nothing allocated for a head that carries no trace fields
        # (the common case at the edge; with ``names``, the head's field names, found by one
        # C-level test), one pass over the fields otherwise, integer sampling draw.
        found = None
        if names is None or _reads_any(names):
            for name, value in head_headers:
                if name in _READ:
                    if found is None:
                        found = {name: value}
                    elif name not in found:
                        found[name] = value

        rng = self._rng
        parent = tracestate = b""
        debug = False
        if found is None:
            request_id, trace, span, low = _new_ids(rng)
            sampled = low < self._bound   # trace[16:] as an int, as below
        else:
            trace = b""
            sampled: bool | None = None
            tp = found.get(b"traceparent")
            if tp is not None:
                parsed = _parse_traceparent(tp)
                if parsed is not None:
                    trace, parent, sampled = parsed
                    tracestate = found.get(b"tracestate", b"")
            if not trace:
                single = found.get(b"b3")
                parsed = _parse_b3_single(single) if single is not None else None
                if parsed is not None:
                    t, s, sampled, debug = parsed
                    if t is not None:
                        trace, parent = t, s
                elif b"x-b3-traceid" in found:
                    t = _b3_trace(found[b"x-b3-traceid"])
                    s = found.get(b"x-b3-spanid", b"").lower()
                    if t is not None and _is_hex(s, (16,)):
                        trace, parent = t, s
                        flag = found.get(b"x-b3-sampled", b"").lower()
                        sampled = True if flag in (b"1", b"true") else False if flag in (b"0", b"false") else None
                        debug = found.get(b"x-b3-flags") == b"1"
            if debug or b"x-client-trace-id" in found or b"x-envoy-force-trace" in found:
                sampled = True
            if not trace:
                trace = b"%032x" % (rng.getrandbits(128) or 1)
            if sampled is None:
                sampled = int(trace[16:], 16) < self._bound
            span = b"%016x" % (rng.getrandbits(64) or 1)
            request_id = found.get(b"x-request-id") or random_uuid(rng)

        if cython.compiled:       # the fields stored at C level: no call with ten arguments
            ctx = TraceContext.__new__(TraceContext)
            ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.request_id = trace, span, parent, request_id
            ctx.sampled, ctx.debug, ctx.kind, ctx.tracestate = sampled, debug, kind, tracestate
            ctx.b3_single, ctx.b3_multi, ctx.start_ns = self.b3_single, self.b3_multi, 0
            ctx.method = ctx.path = ctx.authority = ctx.user_agent = b""
            ctx.scheme, ctx.peer_address = "http", ""
        else:
            ctx = TraceContext(trace, span, parent, sampled, debug, kind, request_id, tracestate,
                               self.b3_single, self.b3_multi)
        if sampled and self._tracer is not None:
            ctx.start_ns = self._clock_ns()
            ctx.method, ctx.path, ctx.authority = method, path, authority
            ctx.scheme, ctx.peer_address = scheme, peer_address
            for name, value in head_headers:
                if name == b"user-agent":
                    ctx.user_agent = value
                    break
        return ctx

    def finish(self, ctx: TraceContext, status: int, *, route_name: str = "", upstream_cluster: str = "",
               subset: str = "", upstream_address: str = "", upstream_port: int = 0, retries: int = 0,
               response_flags: str = "-", end_ns: int | None = None) -> None:
        """Record this hop's span if sampled; a no-op otherwise.  ``status`` 0 = no response."""
        if not ctx.sampled or self._tracer is None:
            return
        export = self.export
        stats = export.stats
        if stats.submitted - stats.dequeued >= export.max_queue_size:
            stats.queue_full += 1
            return
        stats.submitted += 1
        self._record(self._tracer, self._ids, ctx, status, route_name, upstream_cluster, subset, upstream_address,
                     upstream_port, retries, response_flags, end_ns if end_ns is not None else self._clock_ns())
