"""The ``Canary`` resource (``delivery.meshproxy.io/v1``): its one decode boundary.

Modelled on Flagger's ``Canary`` (``spec.analysis`` keeps Flagger's names and defaults), but a
canary here is a *service and two subsets*, not two Deployments::

    spec:
      host: reviews              # the service; its DestinationRule defines the subsets
      virtualService: reviews    # the VirtualService whose route is driven (default: host's name)
      route: main                # optional: the name of the http route (default: the first
                                 # route whose destinations are all the host)
      stable: v1                 # subset serving today
      canary: v2                 # subset being released
      progressDeadlineSeconds: 600
      analysis:
        interval: 10s            # one check per interval
        threshold: 3             # failed checks (over the run) before rollback
        maxWeight: 50            # stepWeight + maxWeight, or stepWeights: [1, 5, 25, 50]
        stepWeight: 10
        iterations: 0            # > 0: A/B (with match) or blue/green (without): N checks, then switch
        match: [...]             # Istio HTTPMatchRequests routed 100% to the canary (A/B)
        mirror: false            # blue/green: mirror mirrorWeight% of stable traffic to the canary
        mirrorWeight: 100
        sessionAffinity: {cookieName: canary, maxAge: 86400}
        minRequests: 100         # canary requests a check needs before it can pass
        confidence: 0.99         # of the one-sided tests that fail a check
        metrics:
        - {name: request-success-rate, thresholdRange: {min: 99}}
        - {name: request-duration, thresholdRange: {max: 500}}
        - name: queue-depth
          query: sum(queue_depth{app="{{ target }}"})
          provider: {type: prometheus, address: "http://prometheus:9090"}
          thresholdRange: {max: 10}
        webhooks:
        - {name: smoke, type: pre-rollout, url: "http://tester/", timeout: 5s, metadata: {cmd: smoke}}

Every key is known or refused; every error names its path; all errors are collected.  A field
accepted but without effect is a warning (the metric ``interval`` of a built-in metric, which
is judged over the check's window instead).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from meshproxy.config.decode import parse_duration

GROUP = "delivery.meshproxy.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Canary"
PLURAL = "canaries"

BUILTIN_METRICS = ("request-success-rate", "request-duration")
WEBHOOK_TYPES = ("pre-rollout", "rollout", "confirm-promotion", "post-rollout", "rollback")
DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 0.1
DEFAULT_PROGRESS_DEADLINE = 600
DEFAULT_MIN_REQUESTS = 100
DEFAULT_CONFIDENCE = 0.99
DEFAULT_WEBHOOK_TIMEOUT = 10.0
DEFAULT_MAX_AGE = 86400
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class ThresholdRange:
    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + (
            [f"<= {self.max:g}"] if self.max is not None else [])
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    threshold: ThresholdRange
    interval: float | None = None       # custom queries: substituted for {{ interval }}
    query: str | None = None            # None = built-in
    provider_address: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    name: str
    type: str
    url: str
    timeout: float = DEFAULT_WEBHOOK_TIMEOUT
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SessionAffinity:
    cookie_name: str
    max_age: int = DEFAULT_MAX_AGE


@dataclass(frozen=True, slots=True)
class Analysis:
    interval: float = DEFAULT_INTERVAL
    threshold: int = 1
    max_weight: int = 100
    step_weight: int = 0
    step_weights: tuple[int, ...] = ()
    iterations: int = 0
    match: tuple[dict, ...] = ()
    mirror: bool = False
    mirror_weight: int = 100
    session_affinity: SessionAffinity | None = None
    min_requests: int = DEFAULT_MIN_REQUESTS
    confidence: float = DEFAULT_CONFIDENCE
    metrics: tuple[MetricSpec, ...] = ()
    webhooks: tuple[WebhookSpec, ...] = ()

    @property
    def strategy(self) -> str:
        """``canary`` (weight steps), ``ab`` (match + iterations) or ``bluegreen`` (iterations)."""
        if self.iterations > 0:
            return "ab" if self.match else "bluegreen"
        return "canary"

    def hooks(self, kind: str) -> tuple[WebhookSpec, ...]:
        return tuple(h for h in self.webhooks if h.type == kind)


@dataclass(frozen=True, slots=True)
class CanarySpec:
    namespace: str
    name: str
    host: str
    virtual_service: str
    stable: str
    canary: str
    route: str | None = None
    progress_deadline: float = DEFAULT_PROGRESS_DEADLINE
    analysis: Analysis = field(default_factory=Analysis)

    @property
    def ref(self) -> str:
        return f"{KIND} {self.namespace}/{self.name}"

    @property
    def fqdn(self) -> str:
        return service_fqdn(self.host, self.namespace)

    def weights(self) -> tuple[int, ...]:
        """The canary weights of the steps, in order (the last one is maxWeight)."""
        a = self.analysis
        if a.strategy != "canary":
            return ()
        if a.step_weights:
            return a.step_weights
        steps = list(range(a.step_weight, a.max_weight, a.step_weight))
        return tuple(steps + [a.max_weight])


def service_fqdn(host: str, namespace: str) -> str:
    """``reviews`` -> ``reviews.<ns>.svc.cluster.local``; ``reviews.prod`` -> ``reviews.prod.svc.cluster.local``."""
    if host.endswith(".svc.cluster.local") or host.count(".") >= 2:
        return host
    if "." in host:
        return f"{host}.svc.cluster.local"
    return f"{host}.{namespace}.svc.cluster.local"


@dataclass
class Decoded:
    spec: CanarySpec | None
    errors: list[str]
    warnings: list[str]


class _Reader:
    def __init__(self, ref: str):
        self.ref = ref
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{self.ref}: {path}: {problem}")

    def warn(self, path: str, problem: str) -> None:
        self.warnings.append(f"{self.ref}: {path}: {problem}")

    def obj(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict | None:
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {type(value).__name__}")
            return None
        for key in value:
            if key not in allowed:
                self.error(f"{path}.{key}", f"unknown field (known: {', '.join(allowed)})")
        return value

    def string(self, m: dict, key: str, path: str, required: bool = False) -> str | None:
        value = m.get(key)
        if value is None:
            if required:
                self.error(f"{path}.{key}", "required")
            return None
        if not isinstance(value, str) or not value:
            self.error(f"{path}.{key}", f"must be a non-empty string, got {value!r}")
            return None
        return value

    def integer(self, m: dict, key: str, path: str, lo: int, hi: int | None = None) -> int | None:
        value = m.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(f"{path}.{key}", f"must be an integer, got {value!r}")
            return None
        if value < lo or (hi is not None and value > hi):
            self.error(f"{path}.{key}", f"must be {lo}..{hi}, got {value}" if hi is not None
                       else f"must be >= {lo}, got {value}")
            return None
        return value

    def number(self, m: dict, key: str, path: str) -> float | None:
        value = m.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(f"{path}.{key}", f"must be a number, got {value!r}")
            return None
        return float(value)

    def duration(self, m: dict, key: str, path: str, minimum: float) -> float | None:
        value = m.get(key)
        if value is None:
            return None
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None:
            self.error(f"{path}.{key}", f'must be a duration like "10s", "500ms" or "1m", got {value!r}')
            return None
        if seconds < minimum - 1e-12:
            self.error(f"{path}.{key}", f"must be >= {minimum:g}s, got {value!r}")
            return None
        return seconds

    def boolean(self, m: dict, key: str, path: str) -> bool | None:
        value = m.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(f"{path}.{key}", f"must be true or false, got {value!r}")
            return None
        return value

    def items(self, m: dict, key: str, path: str):
        value = m.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            self.error(f"{path}.{key}", f"must be a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            yield i, item, f"{path}.{key}[{i}]"


SPEC_KEYS = ("host", "virtualService", "route", "stable", "canary", "progressDeadlineSeconds", "analysis")
ANALYSIS_KEYS = ("interval", "threshold", "maxWeight", "stepWeight", "stepWeights", "iterations", "match",
                 "mirror", "mirrorWeight", "sessionAffinity", "minRequests", "confidence", "metrics", "webhooks")


def decode_canary(obj: dict) -> Decoded:
    """A stored-shape Canary object -> CanarySpec, with every error and warning (path-qualified)."""
    md = obj.get("metadata") or {}
    namespace, name = md.get("namespace") or "default", md.get("name") or "?"
    r = _Reader(f"{KIND} {namespace}/{name}")
    spec = r.obj(obj.get("spec"), "spec", SPEC_KEYS)
    if spec is None:
        return Decoded(None, r.errors, r.warnings)
    host = r.string(spec, "host", "spec", required=True)
    stable = r.string(spec, "stable", "spec", required=True)
    canary = r.string(spec, "canary", "spec", required=True)
    if stable and canary and stable == canary:
        r.error("spec.canary", f"must differ from spec.stable ({stable!r})")
    vs_name = r.string(spec, "virtualService", "spec")
    if vs_name is None and host:
        vs_name = host.split(".", 1)[0]
    route = r.string(spec, "route", "spec")
    deadline = r.integer(spec, "progressDeadlineSeconds", "spec", lo=1)
    analysis = _analysis(r, spec.get("analysis") if spec.get("analysis") is not None else {}, "spec.analysis")
    if r.errors or not (host and stable and canary and analysis):
        return Decoded(None, r.errors, r.warnings)
    return Decoded(CanarySpec(namespace, name, host, vs_name or "", stable, canary, route,
                              float(deadline if deadline is not None else DEFAULT_PROGRESS_DEADLINE), analysis),
                   r.errors, r.warnings)


def _analysis(r: _Reader, raw: Any, path: str) -> Analysis | None:
    a = r.obj(raw, path, ANALYSIS_KEYS)
    if a is None:
        return None
    interval = r.duration(a, "interval", path, MIN_INTERVAL)
    threshold = r.integer(a, "threshold", path, lo=1)
    max_weight = r.integer(a, "maxWeight", path, lo=1, hi=100)
    step_weight = r.integer(a, "stepWeight", path, lo=1, hi=100)
    step_weights: list[int] = []
    for i, w, wpath in r.items(a, "stepWeights", path):
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 100:
            r.error(wpath, f"must be an integer 1..100, got {w!r}")
        elif step_weights and w <= step_weights[-1]:
            r.error(wpath, f"must be larger than the step before ({step_weights[-1]}), got {w}")
        else:
            step_weights.append(w)
    iterations = r.integer(a, "iterations", path, lo=0)
    if step_weight is not None and a.get("stepWeights") is not None:
        r.error(path, "stepWeight and stepWeights cannot be used together")
    if step_weights and max_weight is not None and step_weights[-1] != max_weight:
        r.error(f"{path}.maxWeight", f"must equal the last of stepWeights ({step_weights[-1]}), got {max_weight}")
    if max_weight is None:
        max_weight = step_weights[-1] if step_weights else 100
    if step_weight is not None and step_weight > max_weight:
        r.error(f"{path}.stepWeight", f"must be <= maxWeight ({max_weight}), got {step_weight}")
    if iterations:
        for key in ("stepWeight", "stepWeights", "maxWeight"):
            if a.get(key) is not None:
                r.error(f"{path}.{key}", "cannot be used with iterations (A/B and blue/green switch all traffic "
                                         "after the iterations)")
    elif step_weight is None and not step_weights:
        r.error(path, "one of stepWeight, stepWeights or iterations is required")
    match = []
    for i, m, mpath in r.items(a, "match", path):
        if not isinstance(m, dict) or not m:
            r.error(mpath, "must be a non-empty Istio HTTPMatchRequest mapping")
        else:
            match.append(m)
    if match and not iterations:
        r.error(f"{path}.match", "needs iterations (A/B testing runs iterations checks, then promotes)")
    mirror = r.boolean(a, "mirror", path)
    mirror_weight = r.integer(a, "mirrorWeight", path, lo=1, hi=100)
    if mirror and (not iterations or match):
        r.error(f"{path}.mirror", "only with blue/green (iterations without match)")
    if mirror_weight is not None and not mirror:
        r.error(f"{path}.mirrorWeight", "needs mirror: true")
    affinity = None
    if a.get("sessionAffinity") is not None:
        sa = r.obj(a["sessionAffinity"], f"{path}.sessionAffinity", ("cookieName", "maxAge"))
        if sa is not None:
            cookie = r.string(sa, "cookieName", f"{path}.sessionAffinity", required=True)
            max_age = r.integer(sa, "maxAge", f"{path}.sessionAffinity", lo=1)
            if cookie:
                affinity = SessionAffinity(cookie, max_age if max_age is not None else DEFAULT_MAX_AGE)
    min_requests = r.integer(a, "minRequests", path, lo=1)
    confidence = r.number(a, "confidence", path)
    if confidence is not None and not 0.5 <= confidence < 1.0:
        r.error(f"{path}.confidence", f"must be 0.5 <= confidence < 1, got {confidence:g}")
        confidence = None
    metrics = []
    seen: set[str] = set()
    for i, m, mpath in r.items(a, "metrics", path):
        metric = _metric(r, m, mpath)
        if metric is not None:
            if metric.name in seen:
                r.error(f"{mpath}.name", f"duplicate metric {metric.name!r}")
            seen.add(metric.name)
            metrics.append(metric)
    webhooks = []
    hook_names: set[str] = set()
    for i, h, hpath in r.items(a, "webhooks", path):
        hook = _webhook(r, h, hpath)
        if hook is not None:
            if hook.name in hook_names:
                r.error(f"{hpath}.name", f"duplicate webhook {hook.name!r}")
            hook_names.add(hook.name)
            webhooks.append(hook)
    return Analysis(
        interval=interval if interval is not None else DEFAULT_INTERVAL,
        threshold=threshold if threshold is not None else 1,
        max_weight=max_weight, step_weight=step_weight or 0, step_weights=tuple(step_weights),
        iterations=iterations or 0, match=tuple(match), mirror=bool(mirror),
        mirror_weight=mirror_weight if mirror_weight is not None else 100, session_affinity=affinity,
        min_requests=min_requests if min_requests is not None else DEFAULT_MIN_REQUESTS,
        confidence=confidence if confidence is not None else DEFAULT_CONFIDENCE,
        metrics=tuple(metrics), webhooks=tuple(webhooks))


def _metric(r: _Reader, raw: Any, path: str) -> MetricSpec | None:
    m = r.obj(raw, path, ("name", "thresholdRange", "interval", "query", "provider"))
    if m is None:
        return None
    name = r.string(m, "name", path, required=True)
    interval = r.duration(m, "interval", path, 0.001)
    query = r.string(m, "query", path)
    address = None
    if m.get("provider") is not None:
        p = r.obj(m["provider"], f"{path}.provider", ("type", "address"))
        if p is not None:
            ptype = r.string(p, "type", f"{path}.provider") or "prometheus"
            if ptype != "prometheus":
                r.error(f"{path}.provider.type", f"only prometheus is supported, got {ptype!r}")
            address = r.string(p, "address", f"{path}.provider", required=True)
            if address and not re.match(r"^https?://[^/]+", address):
                r.error(f"{path}.provider.address", f"must be an http(s) URL, got {address!r}")
    tr = None
    if m.get("thresholdRange") is None:
        r.error(f"{path}.thresholdRange", "required (min and/or max): a metric without a range judges nothing")
    else:
        t = r.obj(m["thresholdRange"], f"{path}.thresholdRange", ("min", "max"))
        if t is not None:
            lo = r.number(t, "min", f"{path}.thresholdRange")
            hi = r.number(t, "max", f"{path}.thresholdRange")
            if lo is None and hi is None:
                r.error(f"{path}.thresholdRange", "needs min or max")
            elif lo is not None and hi is not None and lo > hi:
                r.error(f"{path}.thresholdRange", f"min ({lo:g}) is larger than max ({hi:g})")
            else:
                tr = ThresholdRange(lo, hi)
    if name in BUILTIN_METRICS:
        if query is not None or address is not None:
            r.error(path, f"{name} is built in (read from the proxies); query and provider belong to custom metrics")
        if interval is not None:
            r.warn(f"{path}.interval", f"not used: {name} is judged over each check's window of proxy counters")
        if tr is not None and name == "request-success-rate":
            if tr.min is None or tr.max is not None:
                r.error(f"{path}.thresholdRange", "request-success-rate needs min (a percentage) and no max")
            elif not 0 <= tr.min <= 100:
                r.error(f"{path}.thresholdRange.min", f"must be a percentage 0..100, got {tr.min:g}")
        if tr is not None and name == "request-duration":
            if tr.max is None or tr.min is not None:
                r.error(f"{path}.thresholdRange", "request-duration needs max (milliseconds, p99) and no min")
            elif tr.max <= 0:
                r.error(f"{path}.thresholdRange.max", f"must be > 0 ms, got {tr.max:g}")
    elif name is not None:
        if query is None:
            r.error(f"{path}.query", f"required: {name!r} is not a built-in metric "
                                     f"({', '.join(BUILTIN_METRICS)})")
        if address is None:
            r.error(f"{path}.provider", "required for a custom query: {type: prometheus, address: URL}")
    if name is None or tr is None:
        return None
    return MetricSpec(name, tr, interval, query, address)


def _webhook(r: _Reader, raw: Any, path: str) -> WebhookSpec | None:
    h = r.obj(raw, path, ("name", "type", "url", "timeout", "metadata"))
    if h is None:
        return None
    name = r.string(h, "name", path, required=True)
    kind = r.string(h, "type", path) or "rollout"
    if kind not in WEBHOOK_TYPES:
        r.error(f"{path}.type", f"must be one of {', '.join(WEBHOOK_TYPES)}, got {kind!r}")
    url = r.string(h, "url", path, required=True)
    if url and not re.match(r"^https?://[^/]+", url):
        r.error(f"{path}.url", f"must be an http(s) URL, got {url!r}")
    timeout = r.duration(h, "timeout", path, 0.001)
    metadata = h.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        r.error(f"{path}.metadata", "must be a mapping of strings")
        metadata = {}
    if not (name and url) or kind not in WEBHOOK_TYPES:
        return None
    return WebhookSpec(name, kind, url, timeout if timeout is not None else DEFAULT_WEBHOOK_TIMEOUT,
                       tuple(sorted(metadata.items())))


# ---------------------------------------------------------------- references to other resources


def subset_labels(dr: dict, subset: str) -> dict | None:
    for s in (dr.get("spec") or {}).get("subsets") or []:
        if isinstance(s, dict) and s.get("name") == subset:
            return dict(s.get("labels") or {})
    return None


def find_destination_rule(resources, spec: CanarySpec) -> dict | None:
    """The DestinationRule for the canary's host (same namespace first, like Istio's lookup)."""
    candidates = [o for (kind, ns, _), o in resources.items() if kind == "DestinationRule"
                  and service_fqdn(str((o.get("spec") or {}).get("host", "")), ns) == spec.fqdn]
    candidates.sort(key=lambda o: (o["metadata"]["namespace"] != spec.namespace, o["metadata"]["name"]))
    return candidates[0] if candidates else None


def check_references(spec: CanarySpec, resources) -> list[str]:
    """What the canary needs from the store: the VirtualService, a DestinationRule for the host
    with both subsets, each with a distinct ``version`` label (the per-version metrics' key)."""
    errors = []
    vs = resources.get(("VirtualService", spec.namespace, spec.virtual_service))
    if vs is None:
        errors.append(f"{spec.ref}: spec.virtualService: VirtualService {spec.namespace}/{spec.virtual_service} "
                      "not found")
    else:
        from .routing import find_route
        if find_route(vs["spec"], spec) is None:
            what = f"no http route named {spec.route!r}" if spec.route else \
                f"no http route whose destinations are all {spec.host}"
            errors.append(f"{spec.ref}: spec.{'route' if spec.route else 'virtualService'}: VirtualService "
                          f"{spec.namespace}/{spec.virtual_service} has {what}")
    dr = find_destination_rule(resources, spec)
    if dr is None:
        errors.append(f"{spec.ref}: spec.host: no DestinationRule defines subsets for {spec.fqdn}")
        return errors
    versions = {}
    for field_name, subset in (("stable", spec.stable), ("canary", spec.canary)):
        labels = subset_labels(dr, subset)
        where = f"DestinationRule {dr['metadata']['namespace']}/{dr['metadata']['name']}"
        if labels is None:
            errors.append(f"{spec.ref}: spec.{field_name}: unknown subset {subset!r} ({where} has "
                          f"{', '.join(s.get('name', '?') for s in dr['spec'].get('subsets') or []) or 'none'})")
        elif not labels.get("version"):
            errors.append(f"{spec.ref}: spec.{field_name}: subset {subset!r} of {where} has no version label "
                          "(the per-version metrics the analysis reads are keyed by it)")
        else:
            versions[field_name] = labels["version"]
    if len(versions) == 2 and versions["stable"] == versions["canary"]:
        errors.append(f"{spec.ref}: spec.canary: subsets {spec.stable!r} and {spec.canary!r} select the same "
                      f"version label {versions['stable']!r}")
    return errors


def versions_of(spec: CanarySpec, resources) -> tuple[str, str] | None:
    """(stable version label, canary version label), or None when the references are broken."""
    dr = find_destination_rule(resources, spec)
    if dr is None:
        return None
    s, c = subset_labels(dr, spec.stable), subset_labels(dr, spec.canary)
    if not s or not c or not s.get("version") or not c.get("version"):
        return None
    return s["version"], c["version"]
