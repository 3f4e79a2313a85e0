"""Capture mode's pure parts: protocol choice, HTTP sniffing, service VIP allocation, the DNS
resolver's answers (real wire bytes through dnspython), the capture tables the compiler builds."""
from __future__ import annotations

import asyncio
import ipaddress

import dns.flags
import dns.message
import dns.rcode
import pytest

from controlplane.vips import VipAllocator, VipRangeExhausted
from meshproxy.capture.dns import DnsCache, DnsResolver
from meshproxy.capture.pod import parse_app_probers
from meshproxy.capture.sniff import MAX_SNIFF_BYTES, classify
from meshproxy.capture.podinit import CaptureRules, render
from meshproxy.config.capture import BLACKHOLE, PASSTHROUGH, CaptureConfig, port_protocol
from meshproxy.config.compile import ProxyIdentity, WorkloadEndpoint, compile_snapshot
from meshproxy.config.decode import decode_documents
from meshproxy.config.resources import Document


# ---------------------------------------------------------------- protocol selection


@pytest.mark.parametrize("name,app_protocol,number,declared,expected", [
    ("http", "", 9080, "", "HTTP"),
    ("http-web", "", 80, "", "HTTP"),
    ("HTTP2-x", "", 80, "", "HTTP"),
    ("grpc-web-ui", "", 80, "", "HTTP"),
    ("tcp-echo", "", 7000, "", "TCP"),
    ("mysql", "", 3306, "", "TCP"),
    ("tls-x", "", 443, "", "TCP"),
    ("web", "", 8000, "", "SNIFF"),
    ("web", "", 3306, "", "TCP"),                 # server-first port
    ("web", "", 25, "", "TCP"),
    ("tcp-x", "kubernetes.io/h2c", 80, "", "HTTP"),   # appProtocol wins over the name
    ("http", "", 80, "TCP", "TCP"),               # a declared protocol wins over everything
    ("x", "", 80, "GRPC", "HTTP"),
])
def test_port_protocol_follows_istio_precedence(name, app_protocol, number, declared, expected):
    assert port_protocol(name, app_protocol, number, declared) == expected


@pytest.mark.parametrize("data,verdict", [
    (b"", None),
    (b"GE", None),
    (b"GET / HTTP/1.1\r\n", "HTTP"),
    (b"POST /x HTTP/1.0\r\nHost: a\r\n", "HTTP"),
    (b"GET /still-reading", None),
    (b"GET / HTTP/2.0\r\n", "TCP"),
    (b"PRI * HTTP/2.0\r\n", "TCP"),
    (b"\x16\x03\x01\x02\x00", "TCP"),              # a TLS ClientHello
    (b"SSH-2.0-OpenSSH\r\n", "TCP"),
    (b"get / HTTP/1.1\r\n", "TCP"),                # methods are case-sensitive
])
def test_sniffing_tells_http1_from_anything_else(data, verdict):
    assert classify(data) == verdict


def test_sniffing_gives_up_on_a_request_line_longer_than_the_limit():
    assert classify(b"GET /" + b"a" * MAX_SNIFF_BYTES) == "TCP"


# ---------------------------------------------------------------- VIPs


def test_vips_are_sticky_unique_and_released_only_when_the_service_goes():
    alloc = VipAllocator("10.200.0.0/24")
    first = alloc.assign([f"s{i}.default.svc.cluster.local" for i in range(50)])
    assert len(set(first.values())) == 50
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.200.0.0/24") for a in first.values())
    assert not {"10.200.0.0", "10.200.0.255"} & set(first.values())
    second = alloc.assign([f"s{i}.default.svc.cluster.local" for i in range(1, 60)])
    assert all(second[k] == v for k, v in first.items() if k in second)         # nobody moved
    assert "s0.default.svc.cluster.local" not in second
    assert len(set(second.values())) == 59


def test_vips_are_the_same_for_a_fresh_allocator_and_skip_reserved_addresses():
    names = [f"svc{i}.ns.svc.cluster.local" for i in range(20)]
    assert VipAllocator().assign(names) == VipAllocator().assign(list(reversed(names)))
    taken = VipAllocator().assign(names[:1])[names[0]]
    assert VipAllocator().assign(names[:1], reserved=[taken])[names[0]] != taken


def test_a_full_vip_range_is_an_error_not_a_reuse():
    alloc = VipAllocator("10.0.0.0/30")               # two usable addresses
    alloc.assign(["a", "b"])
    with pytest.raises(VipRangeExhausted):
        alloc.assign(["a", "b", "c"])


def test_annotate_gives_workloads_and_single_host_service_entries_their_vip():
    alloc = VipAllocator()
    resources = [
        {"kind": "ServiceEntry", "metadata": {"name": "ext", "namespace": "default"},
         "spec": {"hosts": ["api.example.com"], "resolution": "DNS"}},
        {"kind": "ServiceEntry", "metadata": {"name": "fixed", "namespace": "default"},
         "spec": {"hosts": ["db.example.com"], "addresses": ["10.1.2.3"], "resolution": "STATIC"}},
        {"kind": "ServiceEntry", "metadata": {"name": "optout", "namespace": "default",
                                              "labels": {"networking.istio.io/enable-autoallocate-ip": "false"}},
         "spec": {"hosts": ["no.example.com"], "resolution": "DNS"}},
    ]
    workloads = [{"service": "reviews", "namespace": "default", "address": "10.0.0.3", "ports": {"http": 9080}}]
    out_resources, out_workloads = alloc.annotate(resources, workloads)
    assert out_resources[0]["spec"]["addresses"][0].startswith("240.240.")
    assert "addresses" not in resources[0]["spec"]                # the stored object is untouched
    assert out_resources[1]["spec"]["addresses"] == ["10.1.2.3"]
    assert "addresses" not in out_resources[2]["spec"]
    assert out_workloads[0]["vip"] == alloc.assigned["reviews.default.svc.cluster.local"]


# ---------------------------------------------------------------- capture tables


def _snapshot(docs: str = "", workloads=(), app_ports=(("http", 9080),)):
    import yaml
    bodies = [d for d in yaml.safe_load_all(docs) if d] if docs else []
    decoded = decode_documents([Document(source="t", index=i, body=b) for i, b in enumerate(bodies)])
    assert not decoded.errors, decoded.errors
    identity = ProxyIdentity(namespace="default", capture=CaptureConfig(app_ports=tuple(app_ports)))
    return compile_snapshot(decoded.resources, identity, workloads=list(workloads)).snapshot


def test_capture_tables_map_vips_to_services_and_unknown_destinations_to_passthrough():
    snap = _snapshot(workloads=[
        WorkloadEndpoint("reviews", "default", "10.0.0.3", {"http": 9080}, vip="240.240.0.5"),
        WorkloadEndpoint("echo", "default", "10.0.0.4", {"tcp-echo": 7000}, vip="240.240.0.6")])
    names = [l.name for l in snap.listeners]
    assert names == ["virtualOutbound", "virtualInbound"]        # no explicit HTTP listener
    out = snap.listeners[0].capture
    reviews = out.targets[("240.240.0.5", 9080)]
    assert reviews.protocol == "HTTP"
    fallback = snap.route_tables[reviews.route_table].default
    assert fallback.routes[0].destinations[0].cluster == "outbound|9080||reviews.default.svc.cluster.local"
    echo = out.targets[("240.240.0.6", 7000)]
    assert echo.protocol == "TCP"
    assert echo.tcp.tcp_routes[0].destinations[0].cluster == "outbound|7000||echo.default.svc.cluster.local"
    assert out.unknown_tcp.name == PASSTHROUGH and out.mode == "ALLOW_ANY"
    assert out.names["reviews"] == ("240.240.0.5",) and out.names["echo.default.svc.cluster.local"] == ("240.240.0.6",)
    assert out.http_ports == {9080}
    inbound = snap.listeners[1].capture
    assert inbound.targets[9080].protocol == "HTTP"
    assert snap.clusters["inbound|9080||"].endpoints[0].address == "127.0.0.1"


def test_registry_only_sends_unknown_tcp_to_the_blackhole_and_unknown_http_to_a_502():
    snap = _snapshot("""
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  egress: [{hosts: ["*/*"]}]
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
""")
    out = snap.listeners[0].capture
    assert out.mode == "REGISTRY_ONLY" and out.unknown_tcp.name == BLACKHOLE
    vh = snap.route_tables[out.unknown_http_table].default
    assert vh.name == "block_all" and vh.routes[0].direct_response.status == 502


def test_service_entry_addresses_are_capture_targets():
    snap = _snapshot("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.com]
  addresses: [10.9.9.9/32]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  endpoints: [{address: 10.0.0.50}]
""")
    target = snap.listeners[0].capture.targets[("10.9.9.9", 5432)]
    assert target.protocol == "TCP" and target.service == "db.example.com"
    assert snap.listeners[0].capture.names["db.example.com"] == ("10.9.9.9",)


# ---------------------------------------------------------------- DNS resolver


def _resolver(names=None, upstreams=()):
    table = names if names is not None else {"reviews": ("240.240.0.5",)}
    return DnsResolver(lambda: table, list(upstreams), timeout=0.3, max_inflight=2)


def _ask(resolver, wire):
    return asyncio.run(resolver.answer(wire))


def test_dns_answers_mesh_names_with_their_vip_and_empty_aaaa():
    resolver = _resolver()
    reply = dns.message.from_wire(_ask(resolver, dns.message.make_query("reviews.", "A").to_wire()))
    assert [a.to_text() for rr in reply.answer for a in rr] == ["240.240.0.5"]
    assert reply.flags & dns.flags.AA
    reply = dns.message.from_wire(_ask(resolver, dns.message.make_query("REVIEWS.", "AAAA").to_wire()))
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer


def test_dns_bad_input_gets_formerr_notimp_or_nothing():
    resolver = _resolver()
    reply = _ask(resolver, b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07trunc")
    assert reply[:2] == b"\xab\xcd" and reply[3] & 0xF == dns.rcode.FORMERR
    assert _ask(resolver, b"\x01\x02\x03") is None                      # not even a header
    assert _ask(resolver, b"\x00\x01" + b"\x00" * 5000)[3] & 0xF == dns.rcode.FORMERR   # too large
    response = dns.message.make_response(dns.message.make_query("reviews.", "A"))
    assert _ask(resolver, response.to_wire())[3] & 0xF == dns.rcode.NOTIMP             # not a query


def test_dns_unanswerable_forward_is_servfail_and_a_flood_is_refused():
    async def run():
        # an upstream that never answers: a UDP socket nobody reads
        import socket
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        resolver = _resolver(upstreams=[silent.getsockname()])
        queries = [dns.message.make_query(f"n{i}.example.", "A").to_wire() for i in range(4)]
        replies = await asyncio.gather(*(resolver.answer(q) for q in queries))
        silent.close()
        return [r[3] & 0xF for r in replies]
    codes = asyncio.run(run())
    assert sorted(codes) == sorted([dns.rcode.SERVFAIL] * 2 + [dns.rcode.REFUSED] * 2)


def test_dns_cache_is_bounded_and_expires():
    now = [0.0]
    cache = DnsCache(size=2, clock=lambda: now[0])
    cache.put("a", b"A", 10)
    cache.put("b", b"B", 10)
    cache.put("c", b"C", 10)
    assert cache.get("a") is None and cache.get("c") == b"C" and len(cache) == 2
    now[0] = 11
    assert cache.get("c") is None


# ---------------------------------------------------------------- pod-init rules, probers


def test_pod_init_rules_exempt_the_proxy_before_capturing_and_name_every_exclusion():
    text = render(CaptureRules(proxy_uid=2000, exclude_outbound_ports=(5432,),
                               exclude_outbound_cidrs=("10.0.0.0/8",), exclude_inbound_ports=(22,)))
    outbound = text[text.index("chain outbound"):]
    assert outbound.index("meta skuid 2000 return") < outbound.index("redirect to :15001")
    assert "ip daddr 10.0.0.0/8 return" in outbound and "tcp dport 5432 return" in outbound
    assert "tcp dport { 22, 15021, 15090 } return" in text
    assert "15053" not in text


def test_app_probers_are_parsed_in_istios_format_and_bad_ones_named():
    probers = parse_app_probers('{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080}},'
                                ' "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 3}}')
    assert probers["/app-health/web/readyz"] == ("http", 8080, "/ready", 1.0)
    assert probers["/app-health/web/livez"] == ("tcp", 8080, "", 3.0)
    with pytest.raises(ValueError, match="/app-health/web/nope"):
        parse_app_probers('{"/app-health/web/nope": {"tcpSocket": {"port": 1}}}')
    with pytest.raises(ValueError, match="httpGet.port"):
        parse_app_probers('{"/app-health/web/readyz": {"httpGet": {"port": "http"}}}')


def test_an_app_probe_that_never_answers_is_a_bounded_503():
    import socket
    import time
    from meshproxy.capture.pod import run_probe

    async def probe():
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)                      # accepts (backlog) but never answers
        try:
            started = time.monotonic()
            result = await run_probe("http", silent.getsockname()[1], "/ready", 0.3)
            return result, time.monotonic() - started
        finally:
            silent.close()
    (status, body), took = asyncio.run(probe())
    assert status == 503 and b"probe failed" in body and took < 2.0
