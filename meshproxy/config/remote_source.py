"""Config from the control plane: the push stream's payload -> one snapshot.

The control plane sends Istio resources (as dicts) and registered workloads; they go
through the same :class:`~meshproxy.config.incremental.ConfigBuilder` as files do (one
decode boundary, per-resource refusal with the last good version kept, incremental
compile), off the request loop.  A version with refused resources still applies everything
else; its refusals go back to the control plane per resource (a NACK naming them).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .compile import WorkloadEndpoint
from .incremental import BuildOutcome, BuildRunner, ConfigBuilder
from .remote import ApplyResult, RemoteConfigClient
from .resources import Document
from .store import SnapshotStore

if TYPE_CHECKING:
    from ..process import RunOptions

log = logging.getLogger("meshproxy.config")


def workload_endpoint(w: dict) -> WorkloadEndpoint:
    return WorkloadEndpoint(service=w["service"], namespace=w.get("namespace", "default"), address=w["address"],
                            ports=w.get("ports") or {}, labels=w.get("labels") or {}, vip=w.get("vip") or "",
                            proxy_port=w.get("proxy_port") or 0, identity=w.get("identity") or "")


class PushedConfig:
    """Turns pushed payloads into snapshots: convert, build off the loop, swap on it.

    Workload dicts are converted once per content (the client hands the same dict object for
    an unchanged workload), so an endpoint change converts and compares only what moved."""

    def __init__(self, builder: ConfigBuilder, store: SnapshotStore, telemetry=None,
                 runner: BuildRunner | None = None):
        self.builder = builder
        self.store = store
        self.telemetry = telemetry
        self.runner = runner or BuildRunner()
        self._endpoints: dict[int, tuple[dict, WorkloadEndpoint]] = {}
        self.last: BuildOutcome | None = None

    def _build(self, resources: list[dict], workloads: list[dict], version: str) -> BuildOutcome:
        docs = [Document(source="controlplane", index=i, body=body) for i, body in enumerate(resources)]
        cache, fresh = self._endpoints, {}
        endpoints = []
        for w in workloads:
            hit = cache.get(id(w))
            if hit is None or hit[0] is not w:
                hit = (w, workload_endpoint(w))
            fresh[id(w)] = hit
            endpoints.append(hit[1])
        self._endpoints = fresh
        return self.builder.build(docs, endpoints, version=version)

    async def apply(self, resources: list[dict], workloads: list[dict], version: str) -> ApplyResult:
        try:
            outcome = await self.runner.run(self._build, resources, workloads, version)
        except Exception as err:       # a compiler bug must NACK, never take the proxy down
            log.exception("config %s could not be built", version)
            self.store.reject(version, [f"compile: {err}"])
            return ApplyResult([f"compile: {err}"], {}, applied=False)
        self.last = outcome
        for warning in outcome.warnings:
            log.warning("%s", warning)
        if outcome.snapshot is not None and outcome.snapshot is not self.store.current:
            self.store.swap(outcome.snapshot, outcome.patched)
        if outcome.errors:
            self.store.reject(version, outcome.errors)
            if self.telemetry is not None:
                self.telemetry.config_rejected(version)
            for error in outcome.errors:
                log.error("config %s: resource refused, its last good version keeps serving: %s", version, error)
        return ApplyResult(list(outcome.errors), {ref: list(errs) for ref, errs in outcome.rejected.items()},
                           applied=outcome.snapshot is not None)


class RemoteSource:
    def __init__(self, options: "RunOptions", store: SnapshotStore, telemetry=None, certificates=None):
        self.options = options
        self.store = store
        self.telemetry = telemetry
        identity = options.identity
        info = {"namespace": identity.namespace, "mode": identity.mode, "labels": dict(identity.labels)}
        if options.admin[1]:        # where the control plane reads this proxy's metrics (canary analysis)
            info["admin"] = f"{options.admin[0]}:{options.admin[1]}"
        # over https the stream presents the workload certificate (the control plane's proof
        # of who this proxy is) and verifies the control plane against the current trust bundle
        ssl_context = (lambda: certificates.client_context(check_hostname=True)) if certificates is not None else None
        if certificates is not None:
            info["spiffe"] = certificates.identity.uri    # verified by the control plane over https
        self.pushed = PushedConfig(ConfigBuilder(options.identity, options.settings), store, telemetry)
        self.client = RemoteConfigClient(options.control_plane, options.worker.node_id, info, self.pushed.apply,
                                         options.registration, ssl_context=ssl_context)
        self._task: asyncio.Task | None = None

    async def wait_first_config(self, timeout: float | None = None) -> None:
        """Start the stream and wait until a config is running (or in sync)."""
        self._task = asyncio.get_running_loop().create_task(self.client.run())
        await asyncio.wait_for(self.client.synced.wait(), timeout)

    async def run(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.client.run())
        try:
            await self._task
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    async def deregister(self) -> None:
        try:
            await asyncio.wait_for(self.client.deregister(), 3.0)
        except (asyncio.TimeoutError, OSError):
            log.warning("could not deregister from the control plane")
