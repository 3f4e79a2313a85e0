"""The routing and load-balancing features the README lists, each through a real proxy process
over real sockets, into upstreams that say who answered and what they received.

One proxy (its workload labelled ``app=client``) serves every test of the module; the
upstreams are three endpoints of ``echo.local`` labelled v1/v2/v3, plus endpoints of their
own for the load-balancer tests that need them.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import ProxyProcess


class Echo:
    """A threaded HTTP/1.1 origin that answers every request with JSON saying which endpoint
    it is and what it received; ``delay`` seconds before each answer."""

    def __init__(self, name: str, delay: float = 0.0):
        self.name, self.delay = name, delay
        self.count = 0
        self.lock = threading.Lock()
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with echo.lock:
                    echo.count += 1
                if echo.delay:
                    time.sleep(echo.delay)
                out = json.dumps({"name": echo.name, "method": self.command, "path": self.path,
                                  "host": self.headers.get("host"), "headers": dict(self.headers.items()),
                                  "body": body.decode("latin-1")}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_OPTIONS = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def take_count(self) -> int:
        with self.lock:
            n, self.count = self.count, 0
            return n

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _service_entry(host: str, endpoints: list[tuple[Echo, str]], ports=(80,)) -> str:
    port_lines = "".join(f"  - {{number: {p}, name: http-{p}, protocol: HTTP}}\n" for p in ports)
    eps = "".join(
        f"  - {{address: 127.0.0.1, ports: {{{', '.join(f'http-{p}: {e.port}' for p in ports)}}}, "
        f"labels: {{version: {v}}}}}\n" for e, v in endpoints)
    return (f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: {host.split('.')[0]}, namespace: default}}\n"
            f"spec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
            f"  ports:\n{port_lines}  endpoints:\n{eps}---\n")


ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.local]
  http:
  - name: cors
    match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: "https://allowed.example"}, {regex: "https://.*[.]trusted[.]example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-exposed]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: echo.local, subset: v1}}]
  - name: rewrite
    match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/, authority: rewritten.example}
    route: [{destination: {host: echo.local, subset: v1}}]
  - name: regex-rewrite
    match: [{uri: {prefix: /items/}}]
    rewrite: {uriRegexRewrite: {match: "^/items/([0-9]+)/detail$", rewrite: "/v2/item?id=\\\\1"}}
    route: [{destination: {host: echo.local, subset: v1}}]
  - name: without-headers
    match: [{uri: {prefix: /wh}, withoutHeaders: {x-block: {exact: "1"}}}]
    route: [{destination: {host: echo.local, subset: v2}}]
  - name: query
    match: [{uri: {prefix: /q}, queryParams: {flavour: {exact: canary}}}]
    route: [{destination: {host: echo.local, subset: v2}}]
  - name: case
    match: [{uri: {exact: /CaseTest}, ignoreUriCase: true}]
    route: [{destination: {host: echo.local, subset: v2}}]
  - name: source-other
    match: [{uri: {prefix: /src}, sourceLabels: {app: someone-else}}]
    route: [{destination: {host: echo.local, subset: v3}}]
  - name: source-mine
    match: [{uri: {prefix: /src}, sourceLabels: {app: client}}]
    route: [{destination: {host: echo.local, subset: v2}}]
  - name: default
    route: [{destination: {host: echo.local, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
"""


def _lb_rule(host: str, policy: str) -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: {host.split('.')[0]}, namespace: default}}\n"
            f"spec:\n  host: {host}\n  trafficPolicy:\n{policy}---\n")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    echo = {v: Echo(v) for v in ("v1", "v2", "v3")}
    ring = [Echo(f"ring{i}") for i in range(4)]
    maglev = [Echo(f"maglev{i}") for i in range(4)]
    pls = [Echo(f"pls{i}") for i in range(3)]
    slow, fast = Echo("slow", delay=0.4), Echo("fast")
    old, new = Echo("old"), Echo("new")
    cfg = tmp_path_factory.mktemp("features")
    files = {
        "echo.yaml": _service_entry("echo.local", [(e, v) for v, e in echo.items()]) + ROUTES,
        "ring.yaml": _service_entry("ring.local", [(e, "v1") for e in ring]) + _lb_rule(
            "ring.local", "    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user\n"
                          "        ringHash: {minimumRingSize: 1024}\n"),
        "maglev.yaml": _service_entry("maglev.local", [(e, "v1") for e in maglev]) + _lb_rule(
            "maglev.local", "    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user\n"
                            "        maglev: {tableSize: 65537}\n"),
        # port 80 round robin; port 81 hashes by user
        "pls.yaml": _service_entry("pls.local", [(e, "v1") for e in pls], ports=(80, 81)) + _lb_rule(
            "pls.local", "    loadBalancer: {simple: ROUND_ROBIN}\n    portLevelSettings:\n"
                         "    - port: {number: 81}\n      loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n"),
        "lr.yaml": _service_entry("lr.local", [(slow, "v1"), (fast, "v1")]) + _lb_rule(
            "lr.local", "    loadBalancer: {simple: LEAST_REQUEST}\n"),
        "warm.yaml": _service_entry("warm.local", [(old, "v1")]) + WARM_RULE,
    }
    for name, text in files.items():
        (cfg / name).write_text(text)
    proxy = ProxyProcess(cfg, extra_args=["--labels", "app=client"]).start()
    yield {"proxy": proxy, "echo": echo, "ring": ring, "maglev": maglev, "pls": pls,
           "slow": slow, "fast": fast, "old": old, "new": new, "cfg": cfg}
    proxy.stop()
    for server in [*echo.values(), *ring, *maglev, *pls, slow, fast, old, new]:
        server.close()


def _request(proxy, host: str, path: str = "/", method: str = "GET", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def _who(proxy, host, path="/", **kw) -> dict:
    status, _, body = _request(proxy, host, path, **kw)
    assert status == 200, (status, body[:200])
    return json.loads(body)


# ------------------------------------------------------------------------ CORS

def test_cors_preflight_from_an_allowed_origin_is_answered_by_the_proxy(mesh):
    proxy, v1 = mesh["proxy"], mesh["echo"]["v1"]
    v1.take_count()
    status, headers, _ = _request(proxy, "echo.local", "/cors/x", "OPTIONS", {
        "Origin": "https://allowed.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-custom"})
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://allowed.example"
    assert set(m.strip() for m in headers["access-control-allow-methods"].split(",")) == {"GET", "POST"}
    assert "x-custom" in headers["access-control-allow-headers"].lower()
    assert headers["access-control-max-age"] == "86400"
    assert headers["access-control-allow-credentials"] == "true"
    assert v1.take_count() == 0, "a preflight the policy answers never reaches the upstream"
    # a regex origin
    status, headers, _ = _request(proxy, "echo.local", "/cors/x", "OPTIONS", {
        "Origin": "https://app.trusted.example", "Access-Control-Request-Method": "GET"})
    assert headers.get("access-control-allow-origin") == "https://app.trusted.example"


def test_cors_preflight_from_another_origin_gets_no_allow_headers(mesh):
    status, headers, _ = _request(mesh["proxy"], "echo.local", "/cors/x", "OPTIONS", {
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in headers
    assert "access-control-allow-methods" not in headers


def test_cors_actual_request_reaches_the_upstream_and_carries_the_allow_headers(mesh):
    status, headers, body = _request(mesh["proxy"], "echo.local", "/cors/data", "GET",
                                     {"Origin": "https://allowed.example"})
    assert status == 200 and json.loads(body)["name"] == "v1"
    assert headers["access-control-allow-origin"] == "https://allowed.example"
    assert headers["access-control-expose-headers"].lower() == "x-exposed"
    assert headers["access-control-allow-credentials"] == "true"
    status, headers, _ = _request(mesh["proxy"], "echo.local", "/cors/data", "GET",
                                  {"Origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers


# ------------------------------------------------------------------------ rewrite and matches

def test_rewrite_replaces_the_path_prefix_and_the_authority(mesh):
    got = _who(mesh["proxy"], "echo.local", "/old/a/b?x=1")
    assert got["path"] == "/new/a/b?x=1"
    assert got["host"] == "rewritten.example"


def test_uri_regex_rewrite_substitutes_the_captured_group(mesh):
    assert _who(mesh["proxy"], "echo.local", "/items/42/detail")["path"] == "/v2/item?id=42"
    # no match of the regex: the path goes unchanged
    assert _who(mesh["proxy"], "echo.local", "/items/abc")["path"] == "/items/abc"


def test_without_headers_matches_only_when_the_header_is_absent_or_different(mesh):
    assert _who(mesh["proxy"], "echo.local", "/wh")["name"] == "v2"
    assert _who(mesh["proxy"], "echo.local", "/wh", headers={"x-block": "0"})["name"] == "v2"
    assert _who(mesh["proxy"], "echo.local", "/wh", headers={"x-block": "1"})["name"] == "v1"


def test_query_params_match_the_exact_value(mesh):
    assert _who(mesh["proxy"], "echo.local", "/q?flavour=canary")["name"] == "v2"
    assert _who(mesh["proxy"], "echo.local", "/q?a=1&flavour=canary&b=2")["name"] == "v2"
    assert _who(mesh["proxy"], "echo.local", "/q?flavour=canary-not")["name"] == "v1"
    assert _who(mesh["proxy"], "echo.local", "/q")["name"] == "v1"


def test_ignore_uri_case_matches_the_path_in_any_case(mesh):
    for path in ("/CaseTest", "/casetest", "/CASETEST"):
        got = _who(mesh["proxy"], "echo.local", path)
        assert got["name"] == "v2" and got["path"] == path   # forwarded as sent
    assert _who(mesh["proxy"], "echo.local", "/CaseTest/more")["name"] == "v1"


def test_source_labels_match_this_proxys_workload_labels(mesh):
    # the route for app=someone-else comes first and must not match; app=client does
    assert _who(mesh["proxy"], "echo.local", "/src")["name"] == "v2"


# ------------------------------------------------------------------------ load balancers

@pytest.mark.parametrize("kind", ["ring", "maglev"])
def test_consistent_hash_keeps_each_user_on_one_endpoint_and_spreads_users(mesh, kind):
    host = f"{kind}.local"
    homes = {}
    for user in range(12):
        names = {_who(mesh["proxy"], host, headers={"x-user": f"user-{user}"})["name"] for _ in range(2)}
        assert len(names) == 1, f"user-{user} went to {names}"
        homes[user] = names.pop()
    assert len(set(homes.values())) >= 3, homes


def test_port_level_settings_apply_to_their_port_only(mesh):
    proxy = mesh["proxy"]
    on_81 = {_who(proxy, "pls.local:81", headers={"x-user": "alice"})["name"] for _ in range(6)}
    assert len(on_81) == 1, "port 81 hashes by x-user"
    on_80 = {_who(proxy, "pls.local", headers={"x-user": "alice"})["name"] for _ in range(6)}
    assert len(on_80) == 3, "port 80 keeps the rule's round robin"


def test_least_request_sends_new_requests_away_from_the_busy_endpoint(mesh):
    proxy, slow, fast = mesh["proxy"], mesh["slow"], mesh["fast"]
    slow.take_count(), fast.take_count()
    stop = time.monotonic() + 1.0

    def client():
        n = 0
        while time.monotonic() < stop:
            assert _request(proxy, "lr.local")[0] == 200
            n += 1
        return n

    with ThreadPoolExecutor(6) as pool:
        total = sum(pool.map(lambda _: client(), range(6)))
    to_slow, to_fast = slow.take_count(), fast.take_count()
    assert to_slow + to_fast == total
    # round robin would send half to the slow endpoint (and slow every client down to it);
    # least request sends it only what arrives while it has no more requests than the other
    assert to_slow <= total * 0.15, (to_slow, to_fast)


WARM_RULE = _lb_rule("warm.local", "    loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 20s}\n")


def test_warmup_ramps_a_new_endpoint_up_instead_of_giving_it_its_full_share(mesh):
    proxy, cfg, old, new = mesh["proxy"], mesh["cfg"], mesh["old"], mesh["new"]
    assert _who(proxy, "warm.local")["name"] == "old"
    (cfg / "warm.yaml").write_text(_service_entry("warm.local", [(old, "v1"), (new, "v1")]) + WARM_RULE)
    _wait_for(lambda: _who(proxy, "warm.local")["name"] == "new")
    old.take_count(), new.take_count()
    for _ in range(60):
        assert _request(proxy, "warm.local")[0] == 200
    # in its first seconds of a 20 s warmup the new endpoint weighs 10 % (Envoy's minimum), so
    # it gets about 1 in 11 requests, not the 1 in 2 of plain round robin (the old endpoint,
    # in the config from the start, is not warming)
    assert new.take_count() <= 15


def _wait_for(cond, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")
