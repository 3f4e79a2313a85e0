"""Config from the control plane: the push stream's payload -> one snapshot.

The control plane sends Istio resources (as dicts) and registered workloads; they
go through the same decode boundary and compiler as files do, so a proxy validates
what it is given and NACKs what it cannot run, keeping its last good snapshot.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .compile import WorkloadEndpoint, compile_snapshot
from .decode import decode_documents
from .remote import RemoteConfigClient
from .resources import Document
from .store import SnapshotStore

if TYPE_CHECKING:
    from ..process import RunOptions

log = logging.getLogger("meshproxy.config")


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
        self.client = RemoteConfigClient(options.control_plane, options.worker.node_id, info, self._on_config,
                                         options.registration, ssl_context=ssl_context)
        self._task: asyncio.Task | None = None

    def _on_config(self, resources: list[dict], workloads: list[dict], version: str) -> list[str]:
        docs = [Document(source="controlplane", index=i, body=body) for i, body in enumerate(resources)]
        decoded = decode_documents(docs)
        if decoded.errors:
            self.store.reject(version, decoded.errors)
            if self.telemetry is not None:
                self.telemetry.config_rejected(version)
            for error in decoded.errors:
                log.error("config %s rejected: %s", version, error)
            return list(decoded.errors)
        endpoints = [WorkloadEndpoint(service=w["service"], namespace=w.get("namespace", "default"),
                                      address=w["address"], ports=w.get("ports") or {},
                                      labels=w.get("labels") or {}, vip=w.get("vip") or "",
                                      proxy_port=w.get("proxy_port") or 0)
                     for w in workloads]
        try:
            result = compile_snapshot(decoded.resources, self.options.identity, self.options.settings,
                                      workloads=endpoints, version=version)
        except Exception as err:       # a compiler bug must NACK, never take the proxy down
            log.exception("config %s could not be compiled", version)
            self.store.reject(version, [f"compile: {err}"])
            return [f"compile: {err}"]
        for warning in result.warnings:
            log.warning("%s", warning)
        self.store.swap(result.snapshot)
        return []

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
