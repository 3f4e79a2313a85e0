"""The control plane's composition root: store -> push engine -> API -> HTTP server.

``ControlPlane`` owns every task it starts and closes them in reverse order.  Nothing here
is global: tests start several control planes in one process.
"""
from __future__ import annotations

import asyncio
import signal

from .api import DEFAULT_TTL, Api
from .delivery.api import DeliveryApi
from .delivery.controller import DeliveryController
from .http import HttpServer
from .push import PushEngine
from .store import ConfigStore, StoreError, open_store


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen: expected ADDR:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class ControlPlane:
    def __init__(self, store: ConfigStore, *, debounce: float = 0.1, debounce_max: float = 1.0,
                 default_ttl: float = DEFAULT_TTL, ping_interval: float = 10.0, vip_range: str = ""):
        from .vips import DEFAULT_RANGE, VipAllocator
        from prometheus_client import CollectorRegistry
        from .metrics import ControlPlaneMetrics
        self.store = store
        self.registry = CollectorRegistry()
        self.metrics = ControlPlaneMetrics(self.registry)
        self.push = PushEngine(store, debounce=debounce, debounce_max=debounce_max, ping_interval=ping_interval,
                               metrics=self.metrics, vips=VipAllocator(vip_range or DEFAULT_RANGE))
        self.api = Api(store, self.push, default_ttl=default_ttl, metrics=self.metrics, metrics_registry=self.registry)
        self.delivery = DeliveryController(store, self.push)
        self.delivery_api = DeliveryApi(store, self.delivery, security=getattr(self.api, "security", None))
        self.http = HttpServer(self._handle)
        self._publisher: asyncio.Task | None = None

    async def _handle(self, request):
        response = await self.delivery_api.handle(request)
        return response if response is not None else await self.api.handle(request)

    @property
    def port(self) -> int:
        return self.http.port

    async def start(self, host: str = "127.0.0.1", port: int = 15010) -> None:
        await self.store.start()
        await self.push.start()
        await self.delivery.start()
        await self.http.start(host, port)
        if hasattr(self.store, "publish_proxies"):
            self._publisher = asyncio.create_task(self._publish_proxies(), name="publish-proxies")

    async def _publish_proxies(self, interval: float = 1.0) -> None:
        """With a shared store, tell the other replicas which proxies are connected here."""
        replica = getattr(self.store, "replica_id", "")
        while True:
            items = sorted((dict(p.to_dict(), replica=replica) for p in self.push.proxies.values()),
                           key=lambda p: p["node_id"])
            try:
                await self.store.publish_proxies(items)
            except StoreError as exc:       # retried next round
                print(f"meshctl serve: publishing proxies failed: {exc}", flush=True)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._publisher:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
        await self.http.close()
        await self.delivery.close()
        await self.push.close()
        await self.store.close()


async def serve(store_spec: str, listen: str, *, debounce: float, ttl: float, ready_file: str | None = None,
                vip_range: str = "") -> None:
    host, port = parse_listen(listen)
    cp = ControlPlane(open_store(store_spec), debounce=debounce, default_ttl=ttl, vip_range=vip_range)
    await cp.start(host, port)
    print(f"meshctl serve: listening on http://{host}:{cp.port} (store {store_spec})", flush=True)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(str(cp.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await cp.close()
