"""The canary's outbound calls: webhooks and custom PromQL metrics.  Each call has a deadline.

Webhooks follow Flagger: ``POST url`` with ``{name, namespace, phase, checksum, metadata}``;
a status above 202, a connection error or no answer within ``timeout`` is a failure.

Custom metrics: ``GET {address}/api/v1/query?query=...`` (instant query) after substituting
``{{ namespace }}``, ``{{ target }}`` (the canary subset's version label), ``{{ service }}``
(the host's FQDN) and ``{{ interval }}`` (the metric's interval, default the analysis
interval, in Prometheus' duration syntax).  A vector's single value is the result (several
series: an error, instead of Flagger's silent "last wins"); an empty vector or NaN is "no
values"; a scalar is its value.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass
from urllib.parse import urlencode

from ..httpclient import HttpFailure, post_json, request
from .policy import QueryResult
from .spec import CanarySpec, MetricSpec, WebhookSpec

PROMETHEUS_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class HookResult:
    name: str
    type: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "ok": self.ok, "detail": self.detail}


def checksum(spec: CanarySpec) -> str:
    return hashlib.sha256(f"{spec.stable}/{spec.canary}".encode()).hexdigest()[:16]


async def call_webhook(hook: WebhookSpec, spec: CanarySpec, phase: str) -> HookResult:
    payload = {"name": spec.name, "namespace": spec.namespace, "phase": phase, "checksum": checksum(spec),
               "metadata": dict(hook.metadata)}
    try:
        status, body = await post_json(hook.url, payload, hook.timeout)
    except HttpFailure as exc:
        return HookResult(hook.name, hook.type, False, str(exc))
    text = body[:200].decode(errors="replace").strip()
    if status > 202:
        return HookResult(hook.name, hook.type, False, f"{hook.url} answered {status}: {text}")
    return HookResult(hook.name, hook.type, True, f"{hook.url} answered {status}")


async def call_webhooks(hooks: tuple[WebhookSpec, ...], spec: CanarySpec, phase: str) -> list[HookResult]:
    """All hooks of one type, concurrently; each bounded by its own timeout."""
    return list(await asyncio.gather(*(call_webhook(h, spec, phase) for h in hooks)))


def prometheus_duration(seconds: float) -> str:
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render_query(metric: MetricSpec, spec: CanarySpec, target: str, interval: float) -> str:
    query = metric.query or ""
    values = {"namespace": spec.namespace, "target": target, "service": spec.fqdn, "name": spec.name,
              "interval": prometheus_duration(metric.interval or interval)}
    for key, value in values.items():
        for form in ("{{ %s }}" % key, "{{%s}}" % key):
            query = query.replace(form, value)
    return " ".join(query.split())


async def query_prometheus(address: str, query: str, timeout: float = PROMETHEUS_TIMEOUT) -> QueryResult:
    url = f"{address.rstrip('/')}/api/v1/query?{urlencode({'query': query})}"
    try:
        status, body = await request("GET", url, timeout=timeout)
    except HttpFailure as exc:
        return QueryResult(error=f"prometheus unreachable: {exc}")
    try:
        answer = json.loads(body)
    except ValueError:
        return QueryResult(error=f"prometheus answered {status} with no JSON")
    if status != 200 or answer.get("status") != "success":
        return QueryResult(error=f"prometheus answered {status}: {answer.get('error', body[:200].decode(errors='replace'))}")
    data = answer.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        value = float(result[1])
    elif kind == "vector":
        if not result:
            return QueryResult()
        if len(result) > 1:
            return QueryResult(error=f"query returned {len(result)} series, expected one (aggregate it, e.g. sum(...))")
        value = float(result[0]["value"][1])
    else:
        return QueryResult(error=f"query returned a {kind}, expected a vector or scalar")
    return QueryResult() if math.isnan(value) else QueryResult(value=value)
