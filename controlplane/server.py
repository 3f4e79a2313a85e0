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
from .scope import MeshScope
from .store import ConfigStore, StoreError, open_store


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen: expected ADDR:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class ControlPlane:
    def __init__(self, store: ConfigStore, *, debounce: float = 0.1, debounce_max: float = 1.0,
                 default_ttl: float = DEFAULT_TTL, ping_interval: float = 10.0, vip_range: str = "",
                 security_options: dict | None = None, discovery_namespaces: tuple[str, ...] | None = None):
        from .vips import DEFAULT_RANGE, VipAllocator
        from prometheus_client import CollectorRegistry
        from .metrics import ControlPlaneMetrics
        self.store = store
        self.registry = CollectorRegistry()
        self.metrics = ControlPlaneMetrics(self.registry)
        self.push = PushEngine(store, debounce=debounce, debounce_max=debounce_max, ping_interval=ping_interval,
                               metrics=self.metrics, vips=VipAllocator(vip_range or DEFAULT_RANGE),
                               mesh=MeshScope(discovery_namespaces))
        self.security = None
        if security_options is not None:        # the CA always; TLS + authentication unless tls=False
            from .security.service import Security
            self.security = Security(store, registry=self.registry, **security_options)
        self.api = Api(store, self.push, default_ttl=default_ttl, metrics=self.metrics, metrics_registry=self.registry,
                       security=self.security)
        self.delivery = DeliveryController(store, self.push)
        self.delivery_api = DeliveryApi(store, self.delivery, security=getattr(self.api, "security", None))
        self.http = HttpServer(self._handle)
        self._publisher: asyncio.Task | None = None

    async def _handle(self, request):
        # the delivery API authenticates with the same security object (its reads need view,
        # its writes and canary actions edit; the console's static files are public)
        response = await self.delivery_api.handle(request)
        return response if response is not None else await self.api.handle(request)

    @property
    def port(self) -> int:
        return self.http.port

    async def start(self, host: str = "127.0.0.1", port: int = 15010) -> None:
        await self.store.start()
        if self.security is not None:
            await self.security.start()
        await self.push.start()
        await self.delivery.start()
        await self.http.start(host, port, self.security.server_ssl if self.security else None)
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
        if self.security is not None:
            await self.security.close()
        await self.store.close()


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(store_spec: str, listen: str, *, debounce: float, ttl: float, ready_file: str | None = None,
                security: dict | None = None, credentials: str | None = None, vip_range: str = "",
                discovery_namespaces: tuple[str, ...] | None = None) -> None:
    """Run until SIGTERM/SIGINT.  ``security``: options of :class:`controlplane.security.service.Security`
    (``tls=False`` is --insecure-loopback, refused on a non-loopback address)."""
    host, port = parse_listen(listen)
    security = dict(security or {})
    tls = security.get("tls", True)
    if not tls and not is_loopback(host):
        raise SystemExit(f"meshctl serve: --insecure-loopback serves plaintext without authentication and only on a "
                         f"loopback address; {host} is not one")
    security.setdefault("hosts", (host,))
    cp = ControlPlane(open_store(store_spec), debounce=debounce, default_ttl=ttl, vip_range=vip_range,
                      security_options=security, discovery_namespaces=discovery_namespaces)
    await cp.start(host, port)
    scheme = "https" if tls else "http"
    url_host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{url_host}:{cp.port}"
    print(f"meshctl serve: listening on {url} (store {store_spec}"
          f"{'' if tls else '; plaintext, no authentication: --insecure-loopback'})", flush=True)
    readers = sorted(f"{ns}/{sa}" for ns, sa in cp.security.secret_readers) if cp.security else []
    print("meshctl serve: Secrets (gateway credentials) are pushed to "
          + (f"the gateways of workload identities {', '.join(readers)} only" if readers else
             "no proxy (--insecure-loopback)" if not tls else "no proxy (grant with --secret-readers NS/SA)"),
          flush=True)
    if tls:
        await _credentials(cp, url, credentials)
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


async def _credentials(cp: ControlPlane, url: str, path: str | None) -> None:
    """Write an admin credentials file (server URL, CA bundle, admin token) unless one that
    still works is there; then only its server URL and CA bundle are brought up to date."""
    import json
    import os
    from .security.service import write_private
    from .security.tokens import TokenRefused
    path = path or default_credentials_path()
    existing = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                existing = json.load(f)
            await cp.security.tokens.authenticate(existing["token"])
        except (OSError, ValueError, KeyError, TypeError, TokenRefused):
            existing = None
    if existing is None:
        token = (await cp.security.tokens.create_api("admin", "admin", None, "meshctl serve"))["token"]
        print(f"meshctl serve: wrote admin credentials to {path} (a new admin token)", flush=True)
    else:
        token = existing["token"]
        print(f"meshctl serve: admin credentials in {path}", flush=True)
    cp.security.write_credentials(path, url, token)


def default_credentials_path() -> str:
    import os
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "meshctl", "credentials.json")
