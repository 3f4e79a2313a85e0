"""Retry decisions for one request: :class:`RetryState` (Envoy ``RetryStateImpl``).

The state decides *whether* a failed attempt may be tried again and *how long* to wait.
Whether the cluster has room for one more retry (``maxRetries`` and the retry budget) is
the circuit breaker's question (``ClusterState.admit_retry``), asked by the caller after
this says yes.

Outcomes are an HTTP status (``int``) or one of ``"connect-failure"`` (nothing was sent),
``"refused-stream"`` (nothing was processed), ``"reset"`` (the connection broke after the
request was sent, before a complete response head), ``"timeout"`` (per-try timeout).

Conditions (Envoy ``x-envoy-retry-on``), as implemented:

=========================  =====================================================================
``5xx``                    any 5xx status; connect-failure, refused-stream, reset, timeout
``gateway-error``          502, 503, 504; connect-failure, refused-stream, reset, timeout
``reset``                  reset, connect-failure, refused-stream, timeout (no response at all)
``connect-failure``        connect-failure
``refused-stream``         refused-stream
``retriable-4xx``          409
``retriable-status-codes`` a status in ``policy.retriable_status_codes`` (codes listed in
                           ``retriable_status_codes`` are retried even when the condition name
                           is absent, since Istio adds it implicitly for numeric ``retryOn``)
=========================  =====================================================================

Idempotency (istio/istio#13851, #27340): requests whose method is not GET, HEAD, OPTIONS,
PUT, DELETE or TRACE are retried only after ``connect-failure`` or ``refused-stream``
(the upstream never saw them), unless ``policy.allow_non_idempotent``.
"""
from __future__ import annotations

import random
from typing import Protocol

from ..config.model import RetryPolicy

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
NOTHING_SENT = frozenset({"connect-failure", "refused-stream"})
NO_RESPONSE = frozenset({"connect-failure", "refused-stream", "reset", "timeout"})
OUTCOMES = NO_RESPONSE

_BY_CONDITION_FAILURE = {
    "5xx": NO_RESPONSE,
    "gateway-error": NO_RESPONSE,
    "reset": NO_RESPONSE,
    "connect-failure": frozenset({"connect-failure"}),
    "refused-stream": frozenset({"refused-stream"}),
}


class RetryDecider(Protocol):
    def should_retry(self, attempt: int, outcome: int | str) -> bool: ...
    def backoff(self, attempt: int) -> float: ...


class RetryState:
    """Retry decisions for one request.

    ``attempt`` is the number of tries made so far (1 after the first try failed); a
    retry is allowed while ``attempt <= policy.attempts`` (``attempts`` counts retries).
    """

    __slots__ = ("policy", "method", "idempotent", "rng", "_failure_ok", "_codes", "_any_5xx",
                 "_gateway", "_409")

    def __init__(self, policy: RetryPolicy, method: str, rng: random.Random | None = None):
        self.policy = policy
        self.method = method
        self.idempotent = method in IDEMPOTENT_METHODS
        # pass the worker's rng; the default is the module's shared generator because
        # building a Random per request costs more than the whole routing decision
        self.rng = rng if rng is not None else random._inst
        self._failure_ok, self._any_5xx, self._gateway, self._409 = _conditions(policy.retry_on)
        self._codes = policy.retriable_status_codes

    def should_retry(self, attempt: int, outcome: int | str) -> bool:
        if attempt > self.policy.attempts:
            return False
        if isinstance(outcome, str):
            if outcome not in OUTCOMES:
                raise ValueError(f"retry outcome {outcome!r} is not a status or one of {sorted(OUTCOMES)}")
            if outcome not in self._failure_ok:
                return False
            return self.idempotent or outcome in NOTHING_SENT or self.policy.allow_non_idempotent
        if not (self.idempotent or self.policy.allow_non_idempotent):
            return False
        if outcome >= 500:
            if self._any_5xx:
                return True
            if self._gateway and outcome in (502, 503, 504):
                return True
        elif outcome == 409 and self._409:
            return True
        return outcome in self._codes

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = first retry): Envoy's fully
        jittered exponential back-off, uniform in ``[0, (2**attempt - 1) * base)``, capped at
        ``10 * base`` (25 ms base: [0,25) ms, [0,75) ms, [0,175) ms, then [0,250) ms)."""
        base = self.policy.backoff_base
        ceiling = ((1 << min(max(attempt, 1), 20)) - 1) * base
        return min(self.rng.random() * ceiling, 10 * base)


KNOWN_CONDITIONS = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
    "retriable-status-codes",
})
"""Conditions implemented here.  Others (gRPC ones, ``retriable-headers``) are inert: the
decode step should reject or warn about them; a request is never failed for them."""

# retry_on frozenset -> its decoded form; the policy objects are few and immutable
_CONDITIONS_MEMO: dict[frozenset, tuple] = {}


def _conditions(retry_on: frozenset) -> tuple[frozenset, bool, bool, bool]:
    decoded = _CONDITIONS_MEMO.get(retry_on)
    if decoded is None:
        failure_ok: set[str] = set()
        for condition in retry_on:
            failure_ok |= _BY_CONDITION_FAILURE.get(condition, frozenset())
        decoded = (frozenset(failure_ok), "5xx" in retry_on, "gateway-error" in retry_on,
                   "retriable-4xx" in retry_on)
        if len(_CONDITIONS_MEMO) < 256:
            _CONDITIONS_MEMO[retry_on] = decoded
    return decoded
