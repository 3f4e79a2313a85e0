"""What the request path reports, and to whom.

:class:`Telemetry` is the single object the worker calls at the points of a request's
life that matter to observers (routed, response head, done, rejected, overflow, retry,
upstream connection opened/closed).  It fans out to metrics, tracing and the access
log, each optional, so the pipeline never asks which of them are on.
"""
from __future__ import annotations

from collections import Counter

from ..config.model import Listener, Snapshot


class Telemetry:
    def __init__(self, metrics=None, tracer=None, access_log=None):
        self.metrics = metrics
        self.tracer = tracer
        self.access_log = access_log
        self.requests: Counter = Counter()          # (cluster service, status) -> n
        self.rejected_by_reason: Counter = Counter()
        self.upstream_cx_active = 0
        self.upstream_cx_total = 0
        self.overflows: Counter = Counter()
        self.retries: Counter = Counter()
        self.retry_overflows: Counter = Counter()
        self.draining = False
        self.snapshot_version = ""
        self.mirrors_dropped = 0

    # ---------------------------------------------------------------- config

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot_version = snapshot.version

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    # ---------------------------------------------------------------- requests

    def request_routed(self, exchange) -> None:
        pass

    def response_headers(self, exchange, headers) -> None:
        pass

    def exchange_done(self, exchange, now: float) -> None:
        cluster = exchange.cluster
        service = cluster.cluster.service if cluster is not None else "unknown"
        self.requests[(service, exchange.status, exchange.flags)] += 1

    def rejected(self, reason: str, status: int) -> None:
        self.rejected_by_reason[(reason, status)] += 1

    def overflow(self, cluster: str) -> None:
        self.overflows[cluster] += 1

    def retry(self, cluster: str) -> None:
        self.retries[cluster] += 1

    def mirror_dropped(self) -> None:
        self.mirrors_dropped += 1

    def retry_overflow(self, cluster: str) -> None:
        self.retry_overflows[cluster] += 1

    # ---------------------------------------------------------------- connections

    def upstream_cx_opened(self, key) -> None:
        self.upstream_cx_active += 1
        self.upstream_cx_total += 1

    def upstream_cx_closed(self, key) -> None:
        self.upstream_cx_active -= 1

    def tcp_opened(self, listener: Listener):
        return None

    def tcp_closed(self, listener: Listener):
        return None
