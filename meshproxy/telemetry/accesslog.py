"""Access log: one JSON line per request with Envoy's/Istio's field names.

The request path only appends a tuple of raw values to an in-memory list
(:meth:`AccessLog.log`); formatting and writing happen in :meth:`AccessLog.flush`,
which the owner calls from a periodic task (and which ``log`` asks to be scheduled when
the buffer passes ``flush_threshold``).  The buffer is bounded: when it is full new
entries are dropped and counted.  Sink errors drop the batch and are counted too; the
log never raises into the request path.

For a sink that may block (a pipe whose reader is slow, a network filesystem), the owner
can run the write in a thread: ``entries = log.take()`` on the loop, then
``log.write_entries(entries)`` in an executor.
"""
from __future__ import annotations

from json.encoder import encode_basestring as _encode_str
import random
import time
from typing import BinaryIO, Callable, Iterable

FIELDS = (
    "start_time", "method", "path", "protocol", "response_code", "response_flags", "bytes_received",
    "bytes_sent", "duration", "upstream_host", "upstream_service_time", "x_request_id", "trace_id",
    "route_name", "user_agent", "downstream_remote_address", "authority", "upstream_cluster",
    "response_code_details", "downstream_peer_uri_san",
)


def _text(v):
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v if v not in ("", None) else None       # Envoy's JSON logs write null for "-"


def format_start_time(unix_seconds: float) -> str:
    """Envoy's default %START_TIME%: ``2024-05-01T12:34:56.789Z`` (UTC)."""
    ms = int(round(unix_seconds * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


_LINE = ('{"start_time":"%s","method":%s,"path":%s,"protocol":%s,"response_code":%d,"response_flags":%s,'
         '"bytes_received":%d,"bytes_sent":%d,"duration":%d,"upstream_host":%s,"upstream_service_time":%s,'
         '"x_request_id":%s,"trace_id":%s,"route_name":%s,"user_agent":%s,"downstream_remote_address":%s,'
         '"authority":%s,"upstream_cluster":%s,"response_code_details":%s,"downstream_peer_uri_san":%s}\n')


def _json(v) -> str:
    v = _text(v)
    return "null" if v is None else _encode_str(v)


def format_entry(entry: tuple) -> bytes:
    """One JSON object (keys in :data:`FIELDS` order) and a newline."""
    (start, method, path, protocol, code, flags, rx, tx, duration, up_host, up_time, rid, trace, route, ua,
     peer, authority, cluster, details, peer_uri) = entry
    return (_LINE % (
        format_start_time(start), _json(method), _json(path), _json(protocol), code, _json(flags or "-"),
        rx, tx, int(duration), _json(up_host), "null" if up_time is None else int(up_time), _json(rid),
        _json(trace), _json(route), _json(ua), _json(peer), _json(authority), _json(cluster), _json(details),
        _json(peer_uri),
    )).encode("utf-8")


class AccessLog:
    """Bounded, sampled, buffered JSON access log for one worker.

    ``sink`` is a binary file object (``sys.stdout.buffer``, ``open(path, "ab")``) or a
    callable taking bytes.  ``sample_rate`` applies to successful requests; with
    ``always_log_errors`` a 5xx or any response flag is always logged.
    ``schedule_flush(callback)`` (e.g. ``loop.call_soon``) is used once per buffer fill
    past ``flush_threshold``.
    """

    def __init__(self, sink: BinaryIO | Callable[[bytes], object], *, enabled: bool = True,
                 sample_rate: float = 1.0, always_log_errors: bool = True, rng: random.Random | None = None,
                 max_entries: int = 10000, flush_threshold: int = 1000,
                 schedule_flush: Callable[[Callable[[], object]], object] | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {sample_rate}")
        self._write = sink if callable(sink) and not hasattr(sink, "write") else sink.write
        self._sink_flush = getattr(sink, "flush", None)
        self.enabled = enabled
        self.sample_rate = sample_rate
        self.always_log_errors = always_log_errors
        self._rng = rng or random.Random()
        self.max_entries = max_entries
        self.flush_threshold = flush_threshold
        self._schedule = schedule_flush
        self._scheduled = False
        self._buffer: list[tuple] = []
        self.written = 0
        self.dropped_full = 0
        self.dropped_sink_error = 0

    def log(self, start_time: float, method: bytes, path: bytes, protocol: str, response_code: int,
            response_flags: str, bytes_received: int, bytes_sent: int, duration_ms: float,
            upstream_host: str, upstream_service_time_ms: float | None, x_request_id: bytes, trace_id: bytes,
            route_name: str, user_agent: bytes, downstream_remote_address: str, authority: bytes,
            upstream_cluster: str, response_code_details: str = "", downstream_peer_uri_san: str = "") -> None:
        """Buffer one request's line (``start_time`` in Unix seconds).  Never blocks or raises."""
        if not self.enabled:
            return
        if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
            if not (self.always_log_errors and (response_code >= 500 or response_flags != "-")):
                return
        buf = self._buffer
        if len(buf) >= self.max_entries:
            self.dropped_full += 1
            return
        buf.append((start_time, method, path, protocol, response_code, response_flags, bytes_received,
                    bytes_sent, duration_ms, upstream_host, upstream_service_time_ms, x_request_id, trace_id,
                    route_name, user_agent, downstream_remote_address, authority, upstream_cluster,
                    response_code_details, downstream_peer_uri_san))
        if len(buf) >= self.flush_threshold and self._schedule is not None and not self._scheduled:
            self._scheduled = True
            self._schedule(self.flush)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def take(self) -> list[tuple]:
        """Detach the buffered entries (on the loop); pair with :meth:`write_entries`."""
        entries, self._buffer = self._buffer, []
        self._scheduled = False
        return entries

    def write_entries(self, entries: list[tuple]) -> int:
        """Format and write; safe to run in a thread.  Returns the lines written."""
        if not entries:
            return 0
        try:
            data = b"".join(format_entry(e) for e in entries)
            self._write(data)
            if self._sink_flush is not None:
                self._sink_flush()
        except Exception:                  # a full disk or closed pipe must not reach requests
            self.dropped_sink_error += len(entries)
            return 0
        self.written += len(entries)
        return len(entries)

    def flush(self) -> int:
        return self.write_entries(self.take())

    def counters(self) -> Iterable[tuple[str, tuple[str, ...], int]]:
        yield "meshproxy_accesslog_entries_written_total", (), self.written
        yield "meshproxy_accesslog_entries_dropped_total", ("buffer_full",), self.dropped_full
        yield "meshproxy_accesslog_entries_dropped_total", ("sink_error",), self.dropped_sink_error
