"""Shared fixtures: the codec backends every integration test runs over, a recording
upstream, and a real proxy process configured to route a host to it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CODECS, ProxyProcess, Upstream, service_entry_yaml  # noqa: E402

from meshproxy.codec import DEFAULT_BACKEND  # noqa: E402

pytest_plugins = ["hot_path_usage"]     # --hot-path-usage: which tests the pure-Python rerun needs


@pytest.fixture(params=CODECS)
def codec(request) -> str:
    return request.param


@pytest.fixture
async def upstream():
    up = await Upstream().start()
    yield up
    await up.close()


class ProxyFactory:
    """Starts real proxies: ``factory(yaml_text or {file: text}, codec=..., extra_args=[...])``."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: list[ProxyProcess] = []

    def __call__(self, config: str | dict[str, str], codec: str = DEFAULT_BACKEND, extra_args=None, workers: int = 1,
                 wait: bool = True, listen_port: int | None = None) -> ProxyProcess:
        cfg_dir = self.tmp / f"config{len(self.started)}"
        cfg_dir.mkdir()
        files = {"mesh.yaml": config} if isinstance(config, str) else config
        for name, text in files.items():
            (cfg_dir / name).write_text(text)
        proxy = ProxyProcess(cfg_dir, codec=codec, extra_args=extra_args, workers=workers,
                             listen_port=listen_port)
        self.started.append(proxy)
        return proxy.start(wait=wait)

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()


@pytest.fixture
def proxy_factory(tmp_path):
    """Start real proxies: ``proxy_factory(yaml_text, codec=..., extra_args=[...])``."""
    factory = ProxyFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory):
    """:func:`proxy_factory` for proxies a module's tests share (one start instead of one per test)."""
    factory = ProxyFactory(tmp_path_factory.mktemp("proxies"))
    yield factory
    factory.stop_all()


@pytest.fixture
async def routed_proxy(proxy_factory, upstream, codec):
    """A proxy routing Host ``svc.local`` (and ``svc.default...`` aliases) to ``upstream``."""
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]), codec=codec)
    return proxy


def pytest_report_header(config):
    import meshproxy
    return f"meshproxy hot path: {meshproxy.HOT_PATH}"
