"""The statistics of a canary check: pure functions of counts (no I/O, no clock).

Why these tests.  A check compares the canary with stable *over the same window*: both
versions see the same clients, the same dependencies and the same minute, so a failure they
share (a database hiccup) is not blamed on the canary.  Errors and "slower than the
threshold" are binary outcomes per request, and canary error rates live near zero with small
samples, exactly where the normal approximation (and Wald intervals) break down.  So:

* :func:`fisher_greater` is Fisher's exact test, one-sided: given the errors both versions
  had, how likely is it that the canary got at least as many of them as it did, if the two
  versions were equally good?  Exact at any sample size, including zero errors in stable.
* :func:`binomial_greater` is the exact one-sided binomial test against a fixed rate: used
  when stable had no traffic in the window, and for "is more than 1% of the canary slower
  than the threshold", which is what a p99 over the threshold means.

A check fails only when the canary's number breaks the user's ``thresholdRange`` *and* the
test says it is worse beyond noise (p < 1 - confidence).  Failing needs no minimum sample (a
canary with 3 errors in 20 requests while stable has 0 in 200 is clearly worse, p ~ 0.0007,
so it is rolled back long before a fixed "99% over 100 requests" rule could say so), while
passing needs ``minRequests`` canary requests (so a handful of lucky requests never promote a
bad version).  An equal canary fails a check with probability at most 1 - confidence per
look, and a rollback needs ``threshold`` failed checks on fresh windows.

:func:`histogram_quantile` is Prometheus' interpolation, so the p99 shown is the number a
user's ``histogram_quantile(0.99, ...)`` would show for the same buckets.
"""
from __future__ import annotations

import math


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(errors_c: int, n_c: int, errors_s: int, n_s: int) -> float:
    """One-sided Fisher exact test: P(canary errors >= errors_c) when the errors of both versions
    (errors_c + errors_s among n_c + n_s requests) fell on requests regardless of version.
    Small = the canary is worse than stable."""
    if not (0 <= errors_c <= n_c and 0 <= errors_s <= n_s):
        raise ValueError(f"counts out of range: {errors_c}/{n_c} vs {errors_s}/{n_s}")
    total, errors = n_c + n_s, errors_c + errors_s
    if errors_c == 0 or total == 0:
        return 1.0
    hi = min(errors, n_c)
    log_denominator = _log_comb(total, n_c)
    p = 0.0
    for x in range(errors_c, hi + 1):
        p += math.exp(_log_comb(errors, x) + _log_comb(total - errors, n_c - x) - log_denominator)
    return min(1.0, p)


def binomial_greater(k: int, n: int, p0: float) -> float:
    """One-sided exact binomial test: P(X >= k) for X ~ Binomial(n, p0)."""
    if not 0 <= k <= n:
        raise ValueError(f"k={k} out of 0..{n}")
    if k == 0:
        return 1.0
    if p0 <= 0.0:
        return 0.0
    if p0 >= 1.0:
        return 1.0
    lp, lq = math.log(p0), math.log1p(-p0)
    terms = [_log_comb(n, x) + x * lp + (n - x) * lq for x in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion (shown next to success rates)."""
    if n == 0:
        return 0.0, 1.0
    z = _z(1 - (1 - confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(q: float) -> float:
    """The standard normal quantile (bisection on erf; enough for display intervals)."""
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def histogram_quantile(q: float, bounds: tuple[float, ...], cumulative: tuple[int, ...]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``bounds`` are the finite upper bounds (ascending),
    ``cumulative`` the counts at each bound plus the +Inf count last.  None without samples.
    Linear interpolation inside the bucket; a rank in the +Inf bucket gives the top finite bound."""
    if len(cumulative) != len(bounds) + 1:
        raise ValueError("cumulative needs one count per bound plus +Inf")
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            below = cumulative[i - 1] if i > 0 else 0
            in_bucket = count - below
            if in_bucket <= 0:
                return bounds[i]
            return lower + (bounds[i] - lower) * (rank - below) / in_bucket
    return bounds[-1]


def count_above(limit: float, bounds: tuple[float, ...], cumulative: tuple[int, ...]) -> int:
    """Requests certainly slower than ``limit``: those above the first bucket bound >= limit
    (bucket resolution makes this a lower bound of the true count, never an overcount)."""
    for i, bound in enumerate(bounds):
        if bound >= limit:
            return cumulative[-1] - cumulative[i]
    return 0
