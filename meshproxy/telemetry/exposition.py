"""Render a (merged) metrics dump as Prometheus text 0.0.4 or OpenMetrics 1.0.0.

Families come out in :data:`~meshproxy.telemetry.metrics.FAMILIES` order, series sorted
by label values, so the output is deterministic.  Families with no series are left out.
A family name the catalogue does not know is skipped (dumps and renderer ship together).
"""
from __future__ import annotations

import math

from .metrics import FAMILIES, Family

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _bound(v: float) -> str:
    return repr(float(v))            # "0.5", "1.0", "3600000.0": a float in both formats


def _labels(names: tuple[str, ...], values, extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _render(merged: dict, openmetrics: bool) -> bytes:
    out: list[str] = []
    counters = merged.get("counters", {})
    gauges = merged.get("gauges", {})
    histograms = merged.get("histograms", {})
    for name, fam in FAMILIES.items():
        if fam.type == "counter":
            series = counters.get(name)
        elif fam.type == "gauge":
            series = gauges.get(name)
        else:
            series = histograms.get(name)
        if not series:
            continue
        series = sorted(series, key=lambda s: [str(v) for v in s[0]])
        _family(out, fam, series, openmetrics)
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode("utf-8")


def _family(out: list[str], fam: Family, series: list, openmetrics: bool) -> None:
    meta_name = fam.name[:-len("_total")] if (openmetrics and fam.type == "counter") else fam.name
    out.append(f"# HELP {meta_name} {_escape_help(fam.help)}\n")
    out.append(f"# TYPE {meta_name} {fam.type}\n")
    if fam.type == "histogram":
        bounds = [_bound(b) for b in fam.buckets] + ["+Inf"]
        for labels, buckets, total in series:
            running = 0
            for bound, n in zip(bounds, buckets):
                running += n
                le = 'le="' + bound + '"'
                out.append(f"{fam.name}_bucket{_labels(fam.labels, labels, le)} {running}\n")
            lab = _labels(fam.labels, labels)
            out.append(f"{fam.name}_sum{lab} {_number(total)}\n")
            out.append(f"{fam.name}_count{lab} {running}\n")
    else:
        for labels, value in series:
            out.append(f"{fam.name}{_labels(fam.labels, labels)} {_number(value)}\n")


def render_prometheus(merged: dict) -> bytes:
    """Prometheus text exposition format 0.0.4."""
    return _render(merged, openmetrics=False)


def render_openmetrics(merged: dict) -> bytes:
    """OpenMetrics 1.0.0 text: counter families named without ``_total``, ends in ``# EOF``."""
    return _render(merged, openmetrics=True)


def wants_openmetrics(accept_header: str | None) -> bool:
    """True when the Accept header lists ``application/openmetrics-text`` with q > 0."""
    if not accept_header:
        return False
    for item in accept_header.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        if media.lower() != "application/openmetrics-text":
            continue
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


def render(merged: dict, accept_header: str | None) -> tuple[bytes, str]:
    """Body and Content-Type for a scrape, chosen by its Accept header."""
    if wants_openmetrics(accept_header):
        return render_openmetrics(merged), OPENMETRICS_CONTENT_TYPE
    return render_prometheus(merged), PROMETHEUS_CONTENT_TYPE
