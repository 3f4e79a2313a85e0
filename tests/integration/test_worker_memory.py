"""What a proxy process keeps: a plain sidecar (file config, no certificate, no tracing
export, no capture, no control plane, one worker) must not load the modules only other
features need.  Each of them costs resident memory in every pod's proxy (cryptography
alone is about a quarter of a worker), so they load on first use; this test fails when
one of them comes back on the default path.  It reads the real worker's ``sys.modules``
through the admin's ``/memory`` after a request has gone through it.

The compiled hot path is mapped whole by every process: its modules share one copy of
Cython's helpers (``meshproxy._cyutility``, scripts/build_ext.py) instead of carrying one
each."""
from __future__ import annotations

import json

import pytest

import meshproxy
from helpers import http_get, service_entry_yaml

pytestmark = pytest.mark.asyncio

# module (or package) -> the feature that loads it
OPTIONAL = {
    "cryptography": "a workload certificate (--token-file)",
    "meshproxy.security.manager": "a workload certificate (--token-file)",
    "meshproxy.security.issuer": "a workload certificate (--token-file)",
    "opentelemetry": "span export (--tracing-endpoint)",
    "meshproxy.telemetry.trace_export": "span export (--tracing-endpoint)",
    "dns": "the DNS listener of capture mode (--capture)",
    "meshproxy.capture": "capture mode (--capture) or a supervised application (-- CMD)",
    "meshproxy.config.remote": "a control plane (--control-plane)",
    "meshproxy.config.remote_source": "a control plane (--control-plane)",
    "h11": "the h11 codec (--codec h11) or a response to HEAD",
    "meshproxy.codec.h11_backend": "the h11 codec (--codec h11) or a response to HEAD",
    "multiprocessing": "a process group (--workers N)",
    "meshproxy.config.shared": "a process group (--workers N)",
    "ctypes": "the first malloc_trim, after a burst of connections",
    "difflib": "a config with an unknown field (the decoder's did-you-mean)",
    "shutil": "nothing (argparse imports it for the help width)",
    "controlplane": "nothing: the data plane never imports the control plane",
    "kubernetes": "nothing",
}


def _loaded(modules: list[str], name: str) -> list[str]:
    return [m for m in modules if m == name or m.startswith(name + ".")]


async def test_a_plain_sidecar_worker_loads_no_optional_module(proxy_factory, upstream):
    proxy = proxy_factory(service_entry_yaml("svc.local", 80, [("127.0.0.1", upstream.port, {})]))
    status, _, _ = await http_get(proxy.port, "svc.local", "/through")
    assert status == 200 and upstream.requests[0].target == "/through"
    status, body = proxy.admin("/memory")
    assert status == 200, body
    [worker] = json.loads(body)["processes"]
    assert worker["role"] == "worker" and worker["pid"] == proxy.proc.pid
    modules = worker["modules"]
    # the listing is the worker's own: what served the request is in it
    for used in ("uvloop", "yaml", "meshproxy.proxy.pipeline", "meshproxy.upstream.pool",
                 "meshproxy.security.authz", "meshproxy.config.decode"):
        assert used in modules, used
    assert worker["rss_bytes"] > 10 << 20
    # the worker runs what this test process runs (same tree, same MESHPROXY_PURE)
    assert ("meshproxy._cyutility" in modules) == (meshproxy.HOT_PATH == "compiled"), meshproxy.HOT_PATH
    loaded = {name: _loaded(modules, name) for name in OPTIONAL}
    problems = [f"{name} (needed only for {OPTIONAL[name]}): {', '.join(found[:3])}"
                for name, found in loaded.items() if found]
    assert not problems, "a plain sidecar worker loaded:\n" + "\n".join(problems)
