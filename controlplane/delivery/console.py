"""The web console (``/ui``): static assets from ``controlplane/ui/`` and the one JSON view the
other APIs do not already give, live traffic per service and version.

  GET /ui, /ui/                  the console (index.html); /ui/{app.js,style.css}
  GET /delivery/v1/traffic       per service and version, over the last second or more:
                                 requests/s, success rate, p50/p99 (ms), observed share of the
                                 service's requests, and the configured split of each route;
                                 and per edge into each sidecar (``edges``): the caller's SPIFFE id,
                                 whether it came over mutual TLS, requests/s and the total, with
                                 the connections each proxy refused (plaintext on a STRICT port, ...)
                                 and the requests its AuthorizationPolicies denied; per proxy
                                 (``certificates``) the workload certificate it holds now

Everything else the console shows comes from the APIs meshctl uses: canaries
(``/apis/delivery.meshproxy.io/v1``), proxies (``/push/v1/proxies``), workloads
(``/registry/v1/workloads``), resources and history (``/apis/networking.istio.io/v1``,
``/history``), and the canary actions and ``/history/{rev}/rollback`` for the buttons.

Traffic is read from the proxies (``reporter="source"``: the proxies that choose a version)
at most once a second however many browsers watch; rates are differences of two readings.
Edges come from the same reading: the sidecars' ``reporter="destination"`` samples carry the
caller's ``source_principal`` and ``connection_security_policy`` (``mutual_tls`` or ``none``).
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ..http import Response
from ..httpclient import HttpFailure, request
from .policy import VersionSample
from .samples import DURATION, REQUESTS
from .spec import service_fqdn

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
MIN_SPAN = 1.0
# the page's own files only (no inline script, no other origin); never framed (its buttons act)
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


def parse_all(text: str, reporter: str = "source") -> dict[tuple[str, str], VersionSample]:
    """Prometheus text of one proxy -> {(destination_service, destination_version): cumulative sample}."""
    requests: dict[tuple[str, str], list[int]] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (REQUESTS, DURATION):
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("reporter") != reporter:
                continue
            key = (labels.get("destination_service", ""), labels.get("destination_version", ""))
            if family.name == REQUESTS and sample.name.endswith("_total"):
                counts = requests.setdefault(key, [0, 0])
                counts[0] += int(sample.value)
                if labels.get("response_code", "").startswith("5"):
                    counts[1] += int(sample.value)
            elif family.name == DURATION and sample.name.endswith("_bucket"):
                b = buckets.setdefault(key, {})
                le = float(labels["le"])
                b[le] = b.get(le, 0) + sample.value
    out = {}
    for key, (total, errors) in requests.items():
        b = buckets.get(key, {})
        bounds = tuple(sorted(k for k in b if k != float("inf")))
        cumulative = tuple(int(b[k]) for k in bounds) + (int(b.get(float("inf"), 0)),) if b else ()
        out[key] = VersionSample(total, errors, bounds if b else (), cumulative)
    return out


HANDSHAKE_FAILURES = "meshproxy_tls_handshake_failures"
AUTHZ_DECISIONS = "meshproxy_authz_decisions"
CERT_GAUGES = {"meshproxy_workload_cert_expiry_timestamp_seconds": "expiresAt",
               "meshproxy_workload_cert_valid": "valid", "meshproxy_workload_cert_renewal_failing": "renewalFailing"}


def parse_security(text: str) -> dict:
    """Prometheus text of one proxy -> what reached it and how: ``inbound`` {(caller principal,
    connection_security_policy): requests served}, ``refused`` {reason: connections refused
    before any request}, ``denied``: requests or connections its AuthorizationPolicies denied;
    ``certificate``: the workload certificate it holds now (``expiresAt``, ``valid``,
    ``renewalFailing``), empty without one."""
    inbound: dict[tuple[str, str], int] = {}
    refused: dict[str, int] = {}
    denied = 0
    certificate: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name in CERT_GAUGES:
                certificate[CERT_GAUGES[sample.name]] = sample.value
                continue
            if not sample.name.endswith("_total"):
                continue
            if family.name == REQUESTS and labels.get("reporter") == "destination":
                key = (labels.get("source_principal", "unknown"), labels.get("connection_security_policy", "none"))
                inbound[key] = inbound.get(key, 0) + int(sample.value)
            elif family.name == HANDSHAKE_FAILURES:
                reason = labels.get("reason", "")
                refused[reason] = refused.get(reason, 0) + int(sample.value)
            elif family.name == AUTHZ_DECISIONS and labels.get("decision") == "denied":
                denied += int(sample.value)
    return {"inbound": inbound, "refused": refused, "denied": denied, "certificate": certificate}


def configured_splits(resources) -> dict[str, list[dict]]:
    """service FQDN -> [{virtualService, route, weights: {subset: weight}}] from the VirtualServices."""
    out: dict[str, list[dict]] = {}
    for (kind, ns, name), vs in sorted(resources.items()):
        if kind != "VirtualService":
            continue
        for i, route in enumerate(vs["spec"].get("http") or []):
            dests = [d for d in route.get("route") or [] if isinstance(d, dict)]
            weights: dict[str, dict[str, int]] = {}
            for d in dests:
                dest = d.get("destination") or {}
                host = service_fqdn(str(dest.get("host", "")), ns)
                subset = str(dest.get("subset") or "-")
                w = weights.setdefault(host, {})
                w[subset] = w.get(subset, 0) + int(d.get("weight", 100 if len(dests) == 1 else 0))
            for host, w in weights.items():
                out.setdefault(host, []).append({"virtualService": f"{ns}/{name}", "route": route.get("name") or f"#{i}",
                                                 "weights": w})
    return out


def version_of_subsets(resources) -> dict[tuple[str, str], str]:
    """(service FQDN, subset) -> version label, from the DestinationRules."""
    out = {}
    for (kind, ns, _), dr in resources.items():
        if kind == "DestinationRule":
            host = service_fqdn(str(dr["spec"].get("host", "")), ns)
            for s in dr["spec"].get("subsets") or []:
                version = (s.get("labels") or {}).get("version")
                if version:
                    out[(host, s.get("name"))] = version
    return out


class TrafficView:
    def __init__(self, controller, store, clock=time.monotonic):
        self.controller = controller
        self.store = store
        self.clock = clock
        self._previous: tuple[float, dict] | None = None       # (time, {proxy: {key: sample}})
        self._answer: dict = {"items": [], "seconds": 0.0}
        self._lock = asyncio.Lock()

    async def read(self) -> dict:
        async with self._lock:
            now = self.clock()
            if self._previous is not None and now - self._previous[0] < MIN_SPAN:
                return self._answer
            readings = await self._read_proxies()
            if self._previous is not None:
                self._answer = self._rates(self._previous, (now, readings))
            self._previous = (now, readings)
            return self._answer

    async def _read_proxies(self) -> dict:
        admins = self.controller.proxy_admins()

        async def one(address):
            try:
                status, body = await request("GET", f"http://{address}/stats/prometheus",
                                             timeout=self.controller.read_timeout)
                if status != 200:
                    return address, None
                text = body.decode(errors="replace")
                return address, (parse_all(text), {"node": admins[address], **parse_security(text)})
            except (HttpFailure, ValueError):
                return address, None

        return {a: r for a, r in await asyncio.gather(*(one(a) for a in sorted(admins))) if r is not None}

    def _rates(self, before: tuple[float, dict], after: tuple[float, dict]) -> dict:
        seconds = max(1e-6, after[0] - before[0])
        totals: dict[tuple[str, str], VersionSample] = {}
        for proxy, (samples, _) in after[1].items():
            old = before[1].get(proxy, (None,))[0]
            if old is None:
                continue
            for key, sample in samples.items():
                delta = sample.minus(old[key]) if key in old else sample
                totals[key] = totals.get(key, VersionSample()).plus(delta)
        resources = self.store.resources()
        splits = configured_splits(resources)
        per_service: dict[str, int] = {}
        for (service, _), s in totals.items():
            per_service[service] = per_service.get(service, 0) + s.requests
        items = []
        for (service, version), s in sorted(totals.items()):
            if not s.requests:          # live view: what moved in the window
                continue
            items.append({
                "service": service, "version": version, "requestsPerSecond": round(s.requests / seconds, 2),
                "requests": s.requests, "errors": s.errors,
                "successRate": None if s.success_rate is None else round(s.success_rate, 3),
                "p50": s.quantile(0.5), "p99": s.quantile(0.99),
                "observedShare": round(100.0 * s.requests / per_service[service], 2) if per_service[service] else None})
        subset_versions = version_of_subsets(resources)
        configured = [{"service": host, **route,
                       "versions": {subset: subset_versions.get((host, subset), subset) for subset in route["weights"]}}
                      for host, routes in sorted(splits.items()) for route in routes]
        return {"seconds": round(seconds, 3), "items": items, "configured": configured,
                "edges": edges(before[1], after[1], seconds),
                # the certificate each proxy holds now (the push stream shows the one it connected with)
                "certificates": {now["node"]: now["certificate"] for _, now in after[1].values() if now["certificate"]}}


def edges(before: dict, after: dict, seconds: float) -> list[dict]:
    """Per proxy that served requests or refused connections: who called it (SPIFFE id, "unknown"
    for a caller without a certificate), whether over mutual TLS, requests/s now and in total;
    connections refused by reason and requests denied, in total."""
    out = []
    for address, (_, now) in sorted(after.items(), key=lambda item: item[1][1]["node"]):
        old = before.get(address, (None, {"inbound": {}}))[1]
        for (principal, policy), total in sorted(now["inbound"].items()):
            delta = total - old["inbound"].get((principal, policy), 0)
            out.append({"destination": now["node"], "source": principal, "mutualTls": policy == "mutual_tls",
                        "requestsPerSecond": round(max(0, delta) / seconds, 2), "requests": total})
        if now["refused"] or now["denied"]:
            out.append({"destination": now["node"], "source": None, "refused": dict(now["refused"]),
                        "denied": now["denied"]})
    return out


def asset(name: str) -> Response | None:
    if name not in ASSETS:
        return None
    return Response(200, (UI_DIR / name).read_bytes(), ASSETS[name],
                    headers=[("cache-control", "no-cache"), ("x-content-type-options", "nosniff"),
                             ("content-security-policy", CSP), ("x-frame-options", "DENY")])
