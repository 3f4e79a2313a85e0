"""Passive health: outlier detection (Envoy ``outlier_detection_impl``), per endpoint.

Lifecycle of one endpoint, as a table (an illegal pair raises with state and event)::

    (healthy, eject)   -> ejected     N consecutive errors, and the cluster's cap allows it
    (ejected, expire)  -> healthy     clock passed  ejected_at + base_ejection_time * times_ejected

Counting (``record``):

* ``consecutive_5xx``: 5xx statuses *and* local-origin failures ("connect-failure",
  "reset", "timeout"; Envoy without ``splitExternalLocalOriginErrors`` maps them to
  503/504).  Any status < 500 resets it.
* ``consecutive_gateway_errors``: 502/503/504 and the same local-origin failures; another
  5xx (e.g. 500) resets it, as does any status < 500.
* ``split_local_origin`` (``splitExternalLocalOriginErrors``): local-origin failures count
  only toward ``consecutive_local_origin`` (default 5, Envoy's), reset by any response;
  5xx and gateway counters then see responses only.
* ``http_error_codes`` (``outlierDetectionHttpErrorCodes``): these statuses count as errors
  too (toward ``consecutive_5xx``; a 4xx listed there is not a gateway error).
* The check is made **on the spot** when a counter reaches its threshold (as Envoy does for
  consecutive errors); there is no interval timer (policies start no tasks).
* ``max_ejection_percent``: an endpoint is ejected only if the share already ejected is
  *below* the cap (Envoy's ``ejected_percent < max_ejection_percent``), so one endpoint can
  always be ejected when the cap is > 0.
* Ejection time = ``base_ejection_time * times_ejected`` (capped at 300 s or the base,
  whichever is larger: Envoy's ``max_ejection_time``).  ``times_ejected`` goes down by one for
  each full ``interval`` the endpoint then stays healthy (Envoy decrements on each interval
  tick), computed lazily at the next ejection.
* Un-ejection happens when the time has passed, checked lazily at the next pick or stats
  call (Envoy checks at its interval tick, so it may keep a host out up to one interval
  longer).
* Results arriving for an ejected endpoint (requests in flight when it was ejected) are
  ignored.
"""
from __future__ import annotations

from typing import Callable

from ..config.model import OutlierPolicy

HEALTHY = "healthy"
EJECTED = "ejected"
EJECT = "eject"
EXPIRE = "expire"

TRANSITIONS: dict[tuple[str, str], str] = {
    (HEALTHY, EJECT): EJECTED,
    (EJECTED, EXPIRE): HEALTHY,
}

MAX_EJECTION_TIME = 300.0
LOCAL_ORIGIN_FAILURES = frozenset({"connect-failure", "reset", "timeout"})
_GATEWAY_STATUSES = (502, 503, 504)


class IllegalTransition(RuntimeError):
    pass


def transition(state: str, event: str, who: str = "endpoint") -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"outlier detection: {who}: event {event!r} is not allowed "
                                f"in state {state!r}") from None


class OutlierDetector:
    """Counts results per endpoint and ejects.  Works on the endpoint records of one
    ``ClusterState`` (objects with the fields listed in ``HostHealth``)."""

    __slots__ = ("policy", "clock", "ejection_count")

    def __init__(self, policy: OutlierPolicy, clock: Callable[[], float]):
        self.policy = policy
        self.clock = clock
        self.ejection_count = 0        # total ejections (for stats)

    def record(self, host, outcome: int | str, hosts: list) -> bool:
        """Count one result of ``host``; True if it was ejected by it."""
        if host.state is EJECTED:
            return False
        policy = self.policy
        if isinstance(outcome, str):
            if outcome not in LOCAL_ORIGIN_FAILURES:
                return False          # e.g. "refused-stream": nothing was processed, not the host's fault
            if policy.split_local_origin:
                host.consecutive_local += 1
                if policy.consecutive_local_origin and host.consecutive_local >= policy.consecutive_local_origin:
                    return self._try_eject(host, hosts, "consecutive_local_origin_failures")
                return False
            five, gateway = True, True
        elif outcome >= 500 or outcome in policy.http_error_codes:
            host.consecutive_local = 0            # a response came back: the connection worked
            five, gateway = True, outcome in _GATEWAY_STATUSES
        else:
            host.consecutive_local = 0
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return False
        host.consecutive_5xx += 1
        if gateway:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        if five and policy.consecutive_5xx and host.consecutive_5xx >= policy.consecutive_5xx:
            return self._try_eject(host, hosts, "consecutive_5xx")
        if (gateway and policy.consecutive_gateway_errors
                and host.consecutive_gateway >= policy.consecutive_gateway_errors):
            return self._try_eject(host, hosts, "consecutive_gateway_errors")
        return False

    def _try_eject(self, host, hosts: list, reason: str) -> bool:
        ejected = sum(1 for h in hosts if h.state is EJECTED)
        if 100.0 * ejected / len(hosts) >= self.policy.max_ejection_percent:
            host.ejections_overflowed += 1
            return False
        now = self.clock()
        policy = self.policy
        if host.healthy_since is not None and policy.interval > 0:
            healthy_intervals = int((now - host.healthy_since) // policy.interval)
            host.times_ejected = max(0, host.times_ejected - healthy_intervals)
        host.state = transition(host.state, EJECT, f"{host.endpoint.address}:{host.endpoint.port}")
        host.times_ejected += 1
        duration = min(policy.base_ejection_time * host.times_ejected,
                       max(MAX_EJECTION_TIME, policy.base_ejection_time))
        host.ejected_until = now + duration
        host.ejection_reason = reason
        host.consecutive_5xx = 0
        host.consecutive_gateway = 0
        host.consecutive_local = 0
        self.ejection_count += 1
        return True

    @staticmethod
    def expire(host, now: float) -> None:
        host.state = transition(host.state, EXPIRE, f"{host.endpoint.address}:{host.endpoint.port}")
        host.ejected_until = None
        host.healthy_since = now
