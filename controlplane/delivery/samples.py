"""Per-version request counts, errors and latency histograms, read from the proxies themselves.

Every proxy keeps Istio's standard metrics (``istio_requests_total``,
``istio_request_duration_milliseconds``) with ``destination_service`` and
``destination_version`` labels; the control plane reads them from each connected proxy's admin
listener (``/stats/prometheus``; the proxy names its admin address when it opens its push
stream), so the numbers are exact counts of what the proxies did, with no scrape interval and
no Prometheus in between.

Which side counts:

* canary and A/B steps: ``reporter="source"``, the proxies that apply the split (sidecars of
  the callers, the ingress gateway): each request is counted once, by the proxy that chose
  its version;
* blue/green: ``reporter="destination"``, the versions' own sidecars, because the canary gets
  no routed traffic there (only mirrored or direct requests).

A window is a difference of cumulative readings per proxy (:class:`Baseline`), summed over
proxies; a proxy that restarted (counters went down) contributes what it counted since.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .policy import VersionSample, Window

REQUESTS = "istio_requests"                       # family name as the parser gives it (no _total)
DURATION = "istio_request_duration_milliseconds"


@dataclass(frozen=True, slots=True)
class Selector:
    service: str                    # destination_service FQDN
    stable_version: str
    canary_version: str
    reporter: str = "source"


def parse_versions(text: str, selector: Selector) -> dict[str, VersionSample]:
    """Prometheus text of one proxy -> {"stable": sample, "canary": sample} (cumulative)."""
    wanted = {selector.stable_version: "stable", selector.canary_version: "canary"}
    requests = {"stable": 0, "canary": 0}
    errors = {"stable": 0, "canary": 0}
    buckets: dict[str, dict[float, float]] = {"stable": {}, "canary": {}}
    for family in text_string_to_metric_families(text):
        if family.name not in (REQUESTS, DURATION):
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("reporter") != selector.reporter or labels.get("destination_service") != selector.service:
                continue
            which = wanted.get(labels.get("destination_version", ""))
            if which is None:
                continue
            if family.name == REQUESTS and sample.name.endswith("_total"):
                requests[which] += int(sample.value)
                if labels.get("response_code", "").startswith("5"):
                    errors[which] += int(sample.value)
            elif family.name == DURATION and sample.name.endswith("_bucket"):
                le = float(labels["le"])
                buckets[which][le] = buckets[which].get(le, 0) + sample.value
    out = {}
    for which in ("stable", "canary"):
        b = buckets[which]
        bounds = tuple(sorted(k for k in b if k != float("inf")))
        cumulative = tuple(int(b[k]) for k in bounds) + (int(b.get(float("inf"), 0)),) if b else ()
        out[which] = VersionSample(requests[which], errors[which], bounds if b else (), cumulative)
    return out


class Baseline:
    """Cumulative readings per proxy at the start of a window; :meth:`window` = now - start.
    A proxy first read after the start is adopted: its later counts belong to the window."""

    def __init__(self, readings: dict[str, dict[str, VersionSample]], at: float):
        self.readings = readings
        self.at = at

    def window(self, readings: dict[str, dict[str, VersionSample]], now: float,
               missing: tuple[str, ...] = ()) -> Window:
        total = {"stable": VersionSample(), "canary": VersionSample()}
        for proxy, versions in readings.items():
            before = self.readings.get(proxy)
            if before is None:          # not read at the start: its counts so far are not this window's
                self.readings[proxy] = versions
                continue
            for which in ("stable", "canary"):
                current = versions.get(which, VersionSample())
                delta = current.minus(before[which]) if which in before else current
                total[which] = total[which].plus(delta)
        return Window(total["stable"], total["canary"], max(0.0, now - self.at), len(readings), missing)
