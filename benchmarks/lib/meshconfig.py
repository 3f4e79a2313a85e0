"""Generated meshproxy configs for the benchmark.

``realistic()`` is the issue-3 scenario: 50 services, a VirtualService on the benchmarked host
with 10 http routes whose first 9 match requests the benchmark never sends (so every request walks
them) and a last route splitting 90/10 between subsets v1 and v2 of a DestinationRule. The two
subsets are two endpoints (127.0.0.1 and 127.0.0.2) of the same upstream nginx.
"""
from __future__ import annotations

SERVICES = 50


def _service_entry(name: str, host: str, endpoints: list[tuple[str, dict[str, str]]], port: int) -> str:
    eps = "\n".join(
        f"  - address: {addr}\n    ports: {{http: {port}}}"
        + (f"\n    labels: {{{', '.join(f'{k}: {v}' for k, v in labels.items())}}}" if labels else "")
        for addr, labels in endpoints)
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: ["{host}"]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
{eps}
"""


def realistic(upstream_port: int, tcp_port: int, services: int = SERVICES, with_tcp: bool = True) -> str:
    docs = []
    for i in range(services - 1):
        docs.append(_service_entry(f"svc-{i:02d}", f"svc-{i:02d}.default.svc.cluster.local",
                                   [("127.0.0.1", {"app": f"svc-{i:02d}"})], upstream_port))
    docs.append(_service_entry("bench", "bench.local", [("127.0.0.1", {"version": "v1"}),
                                                         ("127.0.0.2", {"version": "v2"})], upstream_port))
    docs.append("""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bench, namespace: default}
spec:
  host: bench.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
""")
    misses = [
        '- match: [{uri: {prefix: /api/v1/}}]',
        '- match: [{uri: {exact: /login}}]',
        '- match: [{uri: {regex: "/items/[0-9]+"}}]',
        '- match: [{headers: {x-canary: {exact: "true"}}}]',
        '- match: [{headers: {x-user: {prefix: tester-}}}]',
        '- match: [{method: {exact: POST}, uri: {prefix: /upload}}]',
        '- match: [{queryParams: {debug: {exact: "1"}}}]',
        '- match: [{uri: {prefix: /admin}, headers: {x-role: {exact: admin}}}]',
        '- match: [{authority: {exact: other.example}}]',
    ]
    routes = "\n".join(f"  {m}\n    route: [{{destination: {{host: bench.local, subset: v2}}}}]" for m in misses)
    docs.append(f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench, namespace: default}}
spec:
  hosts: ["bench.local"]
  http:
{routes}
  - route:
    - {{destination: {{host: bench.local, subset: v1}}, weight: 90}}
    - {{destination: {{host: bench.local, subset: v2}}, weight: 10}}
""")
    if not with_tcp:
        return "---\n".join(docs)
    docs.append(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench-tcp, namespace: default}}
spec:
  hosts: ["bench-tcp.local"]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: {tcp_port}, name: tcp, protocol: TCP}}
  endpoints:
  - address: 127.0.0.1
    ports: {{tcp: {upstream_port}}}
""")
    docs.append(f"""apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: default}}
spec:
  egress:
  - port: {{number: {tcp_port}, name: tcp, protocol: TCP}}
    bind: 127.0.0.1
    hosts: ["./bench-tcp.local"]
  - hosts: ["./*"]
""")
    return "---\n".join(docs)
