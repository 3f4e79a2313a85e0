"""Istio's bookinfo samples, unchanged, through a real proxy: the routing decisions
Istio's documentation describes for them."""
from __future__ import annotations

import shutil
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from helpers import Upstream, http_get, respond

pytestmark = pytest.mark.asyncio

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio"


async def _reviews(proxy_factory, *samples: str):
    """Three reviews versions behind a ServiceEntry (Kubernetes would supply these
    endpoints), plus the unchanged sample files."""
    ups = {v: await Upstream(respond(200, v.encode())).start() for v in ("v1", "v2", "v3")}
    endpoints = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {u.port}}}, labels: {{app: reviews, version: {v}}}}}"
                          for v, u in ups.items())
    files = {"reviews-endpoints.yaml": textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: reviews, namespace: default}
        spec:
          hosts: [reviews.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 9080, name: http, protocol: HTTP}]
          endpoints:
        """) + endpoints + "\n"}
    for name in samples:
        files[name] = (FIXTURES / name).read_text()
    return proxy_factory(files), ups


async def test_jason_goes_to_v2_and_everyone_else_to_v3(proxy_factory):
    proxy, ups = await _reviews(proxy_factory, "destination-rule-reviews.yaml",
                                "virtual-service-reviews-jason-v2-v3.yaml")
    assert (await http_get(proxy.port, "reviews:9080", headers={"end-user": "jason"}))[2] == b"v2"
    assert (await http_get(proxy.port, "reviews:9080", headers={"end-user": "bob"}))[2] == b"v3"
    assert (await http_get(proxy.port, "reviews:9080"))[2] == b"v3"


async def test_eighty_twenty_split_is_exact(proxy_factory):
    proxy, ups = await _reviews(proxy_factory, "destination-rule-reviews.yaml",
                                "virtual-service-reviews-80-20.yaml")
    counts = Counter([(await http_get(proxy.port, "reviews:9080"))[2] for _ in range(50)])
    assert counts == Counter({b"v1": 40, b"v2": 10})
