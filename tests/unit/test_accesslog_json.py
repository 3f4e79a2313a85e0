"""Access log: Envoy's JSON fields, sampling, bounded buffer, never raises."""
from __future__ import annotations

import io
import json
import random

from meshproxy.telemetry.accesslog import FIELDS, AccessLog


def entry(log: AccessLog, code: int = 200, flags: str = "-", rid: bytes = b"r-1") -> None:
    log.log(1_700_000_000.123, b"GET", b"/reviews/1?x=1", "HTTP/1.1", code, flags, 12, 345, 7.6,
            "10.0.0.5:9080", 5.2, rid, b"4bf92f3577b34da6a3ce929d0e0e4736", "reviews-route", b"curl/8.0",
            "10.0.0.1:51234", b"reviews:9080", "outbound|9080|v2|reviews.default.svc.cluster.local",
            "via_upstream", "spiffe://cluster.local/ns/default/sa/productpage")


def test_one_json_line_per_request_with_envoy_fields():
    out = io.BytesIO()
    log = AccessLog(out)
    entry(log)
    entry(log, 503, "UF", b"r-2")
    assert log.flush() == 2
    lines = out.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert list(first) == list(FIELDS)
    assert first == {
        "start_time": "2023-11-14T22:13:20.123Z", "method": "GET", "path": "/reviews/1?x=1",
        "protocol": "HTTP/1.1", "response_code": 200, "response_flags": "-", "bytes_received": 12,
        "bytes_sent": 345, "duration": 7, "upstream_host": "10.0.0.5:9080", "upstream_service_time": 5,
        "x_request_id": "r-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "route_name": "reviews-route",
        "user_agent": "curl/8.0", "downstream_remote_address": "10.0.0.1:51234", "authority": "reviews:9080",
        "upstream_cluster": "outbound|9080|v2|reviews.default.svc.cluster.local",
        "response_code_details": "via_upstream",
        "downstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/productpage"}
    assert (second["response_code"], second["response_flags"], second["x_request_id"]) == (503, "UF", "r-2")


def test_missing_values_are_null_like_envoy_json_logs():
    out = io.BytesIO()
    log = AccessLog(out)
    log.log(0.0, b"GET", b"/", "HTTP/1.1", 404, "NR", 0, 0, 0, "", None, b"r", b"", "", b"", "1.2.3.4:5", b"h", "")
    log.flush()
    line = json.loads(out.getvalue())
    assert line["upstream_host"] is None and line["upstream_service_time"] is None
    assert line["trace_id"] is None and line["user_agent"] is None and line["upstream_cluster"] is None


def test_nothing_is_written_until_flush_and_nothing_when_disabled():
    out = io.BytesIO()
    log = AccessLog(out)
    entry(log)
    assert out.getvalue() == b"" and log.pending == 1
    off = AccessLog(out, enabled=False)
    entry(off)
    assert off.pending == 0


def test_sampling_keeps_about_the_rate_but_always_keeps_errors():
    log = AccessLog(io.BytesIO(), sample_rate=0.1, rng=random.Random(5), max_entries=100_000)
    for _ in range(5000):
        entry(log)
    kept_ok = log.pending
    for _ in range(50):
        entry(log, 503, "UF")
    assert 350 <= kept_ok <= 650 and log.pending == kept_ok + 50


def test_full_buffer_drops_and_counts():
    log = AccessLog(io.BytesIO(), max_entries=3)
    for _ in range(5):
        entry(log)
    assert log.pending == 3 and log.dropped_full == 2
    counters = {(n, l): v for n, l, v in log.counters()}
    assert counters[("meshproxy_accesslog_entries_dropped_total", ("buffer_full",))] == 2


def test_flush_is_scheduled_once_when_the_buffer_passes_its_threshold():
    scheduled = []
    log = AccessLog(io.BytesIO(), flush_threshold=2, schedule_flush=scheduled.append)
    for _ in range(5):
        entry(log)
    assert scheduled == [log.flush]
    scheduled[0]()
    assert log.pending == 0 and log.written == 5


def test_a_failing_sink_drops_and_counts_without_raising():
    def broken(data: bytes):
        raise BrokenPipeError
    log = AccessLog(broken)
    entry(log)
    entry(log)
    assert log.flush() == 0 and log.dropped_sink_error == 2


def test_quotes_backslashes_and_control_bytes_in_request_fields_stay_valid_json():
    out = io.BytesIO()
    log = AccessLog(out)
    log.log(0.0, b"GET", b'/a"b\\c\x01', "HTTP/1.1", 200, "-", 0, 0, 0, "", None, b"r", b"", "", b"\xff\xfeua",
            "1.2.3.4:5", b"h", "")
    log.flush()
    line = json.loads(out.getvalue())
    assert line["path"] == '/a"b\\c\x01' and line["user_agent"] == "\ufffd\ufffdua"
