"""Request mirroring (Istio ``mirror`` / ``mirrors``): fire and forget.

A mirrored copy goes to the mirror cluster with ``-shadow`` appended to its Host, as
Istio does.  It never affects the real response: it has its own connection, its own
deadline, and its response is read and dropped.  Copies are bounded: a request body
over ``MAX_BODY`` is not mirrored, and at most ``MAX_IN_FLIGHT`` copies run at once
per worker (the rest are dropped and counted).
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..codec.writer import encode_request_head

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..config.model import MirrorPolicy

MAX_BODY = 64 * 1024
MAX_IN_FLIGHT = 64
DEADLINE = 5.0


def shadow_host(authority: bytes) -> bytes:
    host, sep, port = authority.partition(b":")
    return host + b"-shadow" + sep + port


class MirrorCopy:
    """Collects the request body while it streams, then sends the copy."""

    __slots__ = ("runtime", "cluster", "head", "body", "size", "dropped")

    def __init__(self, runtime: "Runtime", cluster, head: bytes):
        self.runtime = runtime
        self.cluster = cluster
        self.head = head
        self.body: list[bytes] = []
        self.size = 0
        self.dropped = False

    def feed(self, data: bytes) -> None:
        if self.dropped:
            return
        self.size += len(data)
        if self.size > MAX_BODY:
            self.dropped = True
            self.body.clear()
        else:
            self.body.append(data)

    def complete(self) -> None:
        if self.dropped:
            return
        runtime = self.runtime
        if len(runtime.mirror_tasks) >= MAX_IN_FLIGHT:
            runtime.telemetry.mirror_dropped()
            return
        task = runtime.loop.create_task(self._send())
        runtime.mirror_tasks.add(task)
        task.add_done_callback(runtime.mirror_tasks.discard)

    async def _send(self) -> None:
        endpoint = self.cluster.pick()
        if endpoint is None:
            return
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.address, endpoint.port), DEADLINE)
            writer.write(self.head + b"".join(self.body))
            await asyncio.wait_for(writer.drain(), DEADLINE)
            # read the response head and stop: the copy's answer is never used
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if writer is not None:
                writer.close()


def start_mirror(runtime: "Runtime", exchange, policy: "MirrorPolicy") -> MirrorCopy | None:
    """Decide (by percentage) whether to mirror this request; returns the copy to feed."""
    if policy.percentage < 100.0 and runtime.rng.random() * 100.0 >= policy.percentage:
        return None
    cluster = runtime.clusters.get(policy.cluster) if policy.cluster else None
    if cluster is None:
        return None
    headers = [(n, shadow_host(v) if n == b"host" else v) for n, v in exchange.forward_headers]
    headers = [h for h in headers if h[0] != b"connection"] + [(b"connection", b"close")]
    return MirrorCopy(runtime, cluster, encode_request_head(exchange.head.method, exchange.forward_path, headers))
