"""Exposition: promtool lints the Prometheus text, a strict OpenMetrics parser (shown
first to reject the OpenMetrics corpus's bad cases) accepts the OpenMetrics text."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from meshproxy.telemetry.accesslog import AccessLog
from meshproxy.telemetry.exposition import (OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, render,
                                            render_openmetrics, render_prometheus)
from meshproxy.telemetry.metrics import MetricsAggregator, PeerInfo, ProxyMetrics
from meshproxy.telemetry.trace_export import SpanExportStats

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "data" / "openmetrics-parsers"
PROMTOOL = shutil.which("promtool")
# Istio's own name; promtool's unit lint prefers seconds.  Renaming would break every
# Istio dashboard, Kiali and Flagger query, so this one finding is accepted, nothing else.
ACCEPTED_LINT = {'istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"'}


def known_traffic() -> dict:
    agg = MetricsAggregator()
    for w in range(2):
        m = ProxyMetrics(worker=w, instance=f"w{w}")
        src = PeerInfo(workload="productpage-v1", namespace="default", app="productpage", version="v1")
        for version, n in (("v1", 45), ("v2", 5)):
            dst = PeerInfo(workload=f"reviews-{version}", namespace="default", app="reviews", version=version,
                           service="reviews.default.svc.cluster.local", service_name="reviews",
                           service_namespace="default")
            h = m.http_handle("source", src, dst)
            for i in range(n):
                m.record_http(h, 200 if i % 5 else 503, "-" if i % 5 else "UF", 1.5 * i, 10 * i, 100 * i)
            t = m.tcp_handle("destination", src, dst)
            m.record_tcp_open(t)
            m.record_tcp_close(t, 1000, 200)
        m.upstream_cx_opened('weird "cluster"\\name\nx')           # escaping
        m.rejected("framing")
        m.pool_overflow("reviews")
        m.retry("reviews")
        m.retry_budget_exhausted("reviews")
        m.outlier_ejected("reviews")
        m.config_applied("v7", True, 1_700_000_000.25)
        m.downstream_cx_opened("http-15006")
        stats = SpanExportStats()
        stats.exported, stats.export_failed = 10, 2
        m.attach(stats)
        m.attach(AccessLog(lambda b: None, rng=random.Random(1)))
        agg.update(w, json.loads(json.dumps(m.dump())))
    return agg.merged()


def promtool_check(body: bytes) -> tuple[int, set[str]]:
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    findings = {line.strip() for line in (proc.stdout + proc.stderr).decode().splitlines() if line.strip()}
    return proc.returncode, findings


def test_prometheus_text_of_known_traffic_passes_promtool_except_istios_milliseconds_name():
    code, findings = promtool_check(render_prometheus(known_traffic()))
    assert findings == ACCEPTED_LINT
    assert code == 3                                   # 3 = lint findings only, 1 would be a parse error


def test_promtool_finds_nothing_in_every_family_but_the_istio_duration():
    merged = known_traffic()
    del merged["histograms"]["istio_request_duration_milliseconds"]
    assert promtool_check(render_prometheus(merged)) == (0, set())


def test_promtool_is_a_real_check_it_flags_a_counter_without_total():
    assert promtool_check(b"# HELP foo x\n# TYPE foo counter\nfoo 1\n")[0] != 0


def corpus_cases(should_parse: bool) -> list[Path]:
    return sorted(d for d in CORPUS.iterdir()
                  if d.is_dir() and json.loads((d / "test.json").read_text())["shouldParse"] is should_parse)


def test_strict_parser_rejects_every_bad_case_of_the_openmetrics_corpus():
    accepted = []
    for case in corpus_cases(False):
        try:
            list(parse_openmetrics((case / "metrics").read_bytes().decode("utf-8", "replace")))
            accepted.append(case.name)
        except Exception:
            pass
    assert len(corpus_cases(False)) == 167 and accepted == []


def test_strict_parser_accepts_every_good_case_of_the_openmetrics_corpus():
    cases = corpus_cases(True)
    assert len(cases) >= 40, "the corpus's good cases are part of the repository"
    for case in cases:
        assert list(parse_openmetrics((case / "metrics").read_text())), case.name


def test_openmetrics_output_of_known_traffic_parses_strictly_with_the_right_values():
    body = render_openmetrics(known_traffic())
    assert body.endswith(b"# EOF\n") and b"\r" not in body
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    requests = families["istio_requests"]
    assert requests.type == "counter"
    by_version = {}
    for s in requests.samples:
        by_version[s.labels["destination_version"]] = by_version.get(s.labels["destination_version"], 0) + s.value
    assert by_version == {"v1": 90, "v2": 10}
    hist = families["istio_request_duration_milliseconds"]
    assert hist.type == "histogram"
    inf = [s for s in hist.samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    counts = [s for s in hist.samples if s.name.endswith("_count")]
    assert sorted(s.value for s in inf) == sorted(s.value for s in counts)
    cx = families["meshproxy_upstream_cx_active"].samples[0]
    assert cx.labels["cluster"] == 'weird "cluster"\\name\nx' and cx.value == 2
    dropped = {s.labels["reason"]: s.value for s in families["meshproxy_tracing_spans_dropped"].samples}
    assert dropped == {"export_failed": 4, "queue_full": 0}


@pytest.mark.parametrize("accept, openmetrics", [
    ("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
    ("text/plain;version=0.0.4", False),
    ("", False),
    (None, False),
    ("application/openmetrics-text;q=0", False),
])
def test_accept_header_chooses_the_format(accept, openmetrics):
    body, content_type = render(known_traffic(), accept)
    assert content_type == (OPENMETRICS_CONTENT_TYPE if openmetrics else PROMETHEUS_CONTENT_TYPE)
    assert body.endswith(b"# EOF\n") is openmetrics
