"""The canary's decisions as small pure policies: metric checks, the judge, the step plan and
the phase table.  They hold no sockets, start no tasks and read no clock; the controller feeds
them numbers and applies what they decide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import stats
from .spec import Analysis, CanarySpec, MetricSpec

PASS, FAIL, NO_DATA = "pass", "fail", "no-data"

# ---------------------------------------------------------------- samples


@dataclass(frozen=True, slots=True)
class VersionSample:
    """One version's requests in a window, as counted by the proxies (exact, not sampled)."""
    requests: int = 0
    errors: int = 0                                  # 5xx responses
    bounds: tuple[float, ...] = ()                   # duration histogram bounds (ms)
    cumulative: tuple[int, ...] = ()                 # counts at each bound, +Inf last

    def minus(self, other: "VersionSample") -> "VersionSample":
        """This cumulative reading minus an earlier one of the same proxy (a counter that went
        down means the proxy restarted: then everything counted now is new)."""
        if self.requests < other.requests or self.errors < other.errors or (
                other.cumulative and any(a < b for a, b in zip(self.cumulative, other.cumulative))):
            return self
        cumulative = (tuple(a - b for a, b in zip(self.cumulative, other.cumulative))
                      if other.cumulative and self.bounds == other.bounds else self.cumulative)
        return VersionSample(self.requests - other.requests, self.errors - other.errors, self.bounds, cumulative)

    def plus(self, other: "VersionSample") -> "VersionSample":
        if not self.cumulative:
            cumulative, bounds = other.cumulative, other.bounds
        elif not other.cumulative:
            cumulative, bounds = self.cumulative, self.bounds
        else:
            if self.bounds != other.bounds:
                raise ValueError("histograms with different bucket bounds cannot be added")
            cumulative, bounds = tuple(a + b for a, b in zip(self.cumulative, other.cumulative)), self.bounds
        return VersionSample(self.requests + other.requests, self.errors + other.errors, bounds, cumulative)

    @property
    def success_rate(self) -> float | None:
        return 100.0 * (self.requests - self.errors) / self.requests if self.requests else None

    def quantile(self, q: float) -> float | None:
        return stats.histogram_quantile(q, self.bounds, self.cumulative) if self.cumulative else None


@dataclass(frozen=True, slots=True)
class Window:
    """Stable and canary over the same span of time, from every proxy that reported."""
    stable: VersionSample
    canary: VersionSample
    seconds: float = 0.0
    proxies: int = 0
    missing: tuple[str, ...] = ()                    # proxies that did not answer (node: reason)


@dataclass(frozen=True, slots=True)
class MetricResult:
    name: str
    verdict: str
    value: float | None = None
    stable_value: float | None = None
    threshold: str = ""
    p_value: float | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "value": self.value, "stable": self.stable_value,
                "threshold": self.threshold, "pValue": self.p_value, "detail": self.detail}


class MetricCheck(Protocol):
    name: str

    def judge(self, window: Window) -> MetricResult: ...


# ---------------------------------------------------------------- built-in checks


@dataclass(frozen=True, slots=True)
class SuccessRateCheck:
    """request-success-rate >= min (percent): fails when the canary is below min AND has
    significantly more 5xx than stable in the same window (Fisher, one-sided); with no stable
    traffic, significantly more than the error rate min allows (exact binomial)."""
    min_percent: float
    alpha: float
    min_requests: int
    name: str = "request-success-rate"

    def judge(self, window: Window) -> MetricResult:
        c, s = window.canary, window.stable
        threshold = f">= {self.min_percent:g}%"
        if c.requests == 0:
            return MetricResult(self.name, NO_DATA, None, s.success_rate, threshold,
                                detail=f"not enough data: 0/{self.min_requests} canary requests")
        if s.requests:
            p = stats.fisher_greater(c.errors, c.requests, s.errors, s.requests)
            against = f"stable {s.errors}/{s.requests} errors"
        else:
            p = stats.binomial_greater(c.errors, c.requests, 1 - self.min_percent / 100)
            against = f"the {100 - self.min_percent:g}% error budget (no stable traffic)"
        rate = c.success_rate
        detail = f"canary {c.errors}/{c.requests} errors vs {against}, p={p:.3g}"
        if rate < self.min_percent and p < self.alpha:
            return MetricResult(self.name, FAIL, rate, s.success_rate, threshold, p, detail)
        if c.requests < self.min_requests:
            return MetricResult(self.name, NO_DATA, rate, s.success_rate, threshold, p,
                                f"not enough data: {c.requests}/{self.min_requests} canary requests; {detail}")
        if rate < self.min_percent:
            detail += " (below the threshold, but not worse than stable beyond noise)"
        return MetricResult(self.name, PASS, rate, s.success_rate, threshold, p, detail)


@dataclass(frozen=True, slots=True)
class DurationCheck:
    """request-duration p99 <= max (ms): fails when the canary's p99 is over max AND more than 1%
    of its requests are slower than max beyond noise (binomial) AND more of them than of
    stable's (Fisher), i.e. the canary itself is slow, not the minute."""
    max_ms: float
    alpha: float
    min_requests: int
    name: str = "request-duration"

    def judge(self, window: Window) -> MetricResult:
        c, s = window.canary, window.stable
        threshold = f"p99 <= {self.max_ms:g} ms"
        p99, stable_p99 = c.quantile(0.99), s.quantile(0.99)
        if c.requests == 0 or p99 is None:
            return MetricResult(self.name, NO_DATA, None, stable_p99, threshold,
                                detail=f"not enough data: 0/{self.min_requests} canary requests")
        slow_c = stats.count_above(self.max_ms, c.bounds, c.cumulative)
        total_c = c.cumulative[-1]
        p = stats.binomial_greater(slow_c, total_c, 0.01)
        detail = f"canary {slow_c}/{total_c} slower than {self.max_ms:g} ms (p={p:.3g} vs 1%)"
        if s.cumulative and s.cumulative[-1]:
            slow_s = stats.count_above(self.max_ms, s.bounds, s.cumulative)
            p_s = stats.fisher_greater(slow_c, total_c, slow_s, s.cumulative[-1])
            detail += f", stable {slow_s}/{s.cumulative[-1]} (p={p_s:.3g})"
            p = max(p, p_s)
        if p99 > self.max_ms and p < self.alpha:
            return MetricResult(self.name, FAIL, p99, stable_p99, threshold, p, detail)
        if c.requests < self.min_requests:
            return MetricResult(self.name, NO_DATA, p99, stable_p99, threshold, p,
                                f"not enough data: {c.requests}/{self.min_requests} canary requests; {detail}")
        return MetricResult(self.name, PASS, p99, stable_p99, threshold, p, detail)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What the controller got for a custom query: a value, nothing, or an error."""
    value: float | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class CustomCheck:
    """A PromQL metric: its value against thresholdRange.  An unreachable or failing Prometheus
    is a failed check (it cannot vouch for the canary); an empty result is "not enough data"
    (the step waits, bounded by progressDeadline) instead of Flagger's failed check."""
    metric: MetricSpec

    @property
    def name(self) -> str:
        return self.metric.name

    def judge_value(self, result: QueryResult) -> MetricResult:
        threshold = self.metric.threshold.describe()
        if result.error:
            return MetricResult(self.name, FAIL, None, None, threshold, detail=result.error)
        if result.value is None:
            return MetricResult(self.name, NO_DATA, None, None, threshold, detail="not enough data: query returned no values")
        verdict = PASS if self.metric.threshold.holds(result.value) else FAIL
        return MetricResult(self.name, verdict, result.value, None, threshold,
                            detail=f"{self.name} = {result.value:g} ({'within' if verdict == PASS else 'outside'} {threshold})")


def builtin_checks(analysis: Analysis) -> list[MetricCheck]:
    alpha = 1 - analysis.confidence
    checks: list[MetricCheck] = []
    for m in analysis.metrics:
        if m.name == "request-success-rate":
            checks.append(SuccessRateCheck(m.threshold.min, alpha, analysis.min_requests))
        elif m.name == "request-duration":
            checks.append(DurationCheck(m.threshold.max, alpha, analysis.min_requests))
    return checks


# ---------------------------------------------------------------- the judge


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: str
    results: tuple[MetricResult, ...] = ()
    reason: str = ""

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "metrics": [r.to_dict() for r in self.results]}


def judge(results: list[MetricResult], window: Window, min_requests: int) -> Decision:
    """All metric results -> one verdict.  Any failure fails; else any missing data waits; a
    window with no metrics still needs minRequests canary requests to pass."""
    failed = [r for r in results if r.verdict == FAIL]
    if failed:
        return Decision(FAIL, tuple(results), "; ".join(f"{r.name}: {r.detail}" for r in failed))
    if window.missing:
        return Decision(NO_DATA, tuple(results), "not enough data: proxies did not report: " + ", ".join(window.missing))
    waiting = [r for r in results if r.verdict == NO_DATA]
    if waiting:
        return Decision(NO_DATA, tuple(results), "; ".join(f"{r.name}: {r.detail}" for r in waiting))
    if not results and window.canary.requests < min_requests:
        return Decision(NO_DATA, (), f"not enough data: {window.canary.requests}/{min_requests} canary requests")
    return Decision(PASS, tuple(results), "all checks passed")


# ---------------------------------------------------------------- the plan of steps


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What a passed check leads to: the next weight, another iteration, or promotion."""
    strategy: str                       # canary | ab | bluegreen
    weights: tuple[int, ...] = ()
    iterations: int = 0

    @classmethod
    def of(cls, spec: CanarySpec) -> "StepPlan":
        return cls(spec.analysis.strategy, spec.weights(), spec.analysis.iterations)

    def first_weight(self) -> int:
        return self.weights[0] if self.strategy == "canary" else 0

    def after_pass(self, weight: int, iterations_done: int) -> tuple[str, int, int]:
        """-> ("advance" | "promote", new weight, new iterations_done)."""
        if self.strategy == "canary":
            later = [w for w in self.weights if w > weight]
            if later:
                return "advance", later[0], iterations_done
            return "promote", weight, iterations_done
        done = iterations_done + 1
        return ("promote" if done >= self.iterations else "advance"), weight, done


# ---------------------------------------------------------------- phases

INITIALIZING, PROGRESSING, WAITING_PROMOTION, PROMOTING = "Initializing", "Progressing", "WaitingPromotion", "Promoting"
SUCCEEDED, FAILED = "Succeeded", "Failed"
TERMINAL = (SUCCEEDED, FAILED)

START, PROMOTE, WAIT, CONFIRMED, DONE, ROLLBACK, RESTART = (
    "start", "promote", "wait-promotion", "confirmed", "done", "rollback", "restart")

PHASES: dict[tuple[str, str], str] = {
    (INITIALIZING, START): PROGRESSING,
    (INITIALIZING, ROLLBACK): FAILED,
    (INITIALIZING, PROMOTE): PROMOTING,         # promoted by hand before the first step
    (PROGRESSING, PROMOTE): PROMOTING,
    (PROGRESSING, WAIT): WAITING_PROMOTION,
    (PROGRESSING, ROLLBACK): FAILED,
    (WAITING_PROMOTION, CONFIRMED): PROMOTING,
    (WAITING_PROMOTION, WAIT): WAITING_PROMOTION,
    (WAITING_PROMOTION, ROLLBACK): FAILED,
    (PROMOTING, DONE): SUCCEEDED,
    (SUCCEEDED, RESTART): INITIALIZING,
    (FAILED, RESTART): INITIALIZING,
    (PROGRESSING, RESTART): INITIALIZING,
    (WAITING_PROMOTION, RESTART): INITIALIZING,
    (PROMOTING, RESTART): INITIALIZING,
    (INITIALIZING, RESTART): INITIALIZING,
}


class IllegalPhase(Exception):
    pass


def next_phase(phase: str, event: str) -> str:
    try:
        return PHASES[(phase, event)]
    except KeyError:
        raise IllegalPhase(f"canary: event {event!r} is illegal in phase {phase!r}") from None
