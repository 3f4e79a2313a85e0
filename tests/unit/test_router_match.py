"""Route matching precedence and each match kind (meshproxy.router.match)."""
import re
from types import MappingProxyType

import pytest

from meshproxy.codec.api import RequestHead
from meshproxy.config.model import (HeaderMatch, HttpRoute, RouteMatch, RouteTable, StringMatch,
                                    VirtualHost, WeightedDestination)
from meshproxy.router.match import block_matches, block_mismatch, select_route, select_virtual_host
from meshproxy.router.request import RequestView


def both(block, request):
    """block_matches and block_mismatch (explain's reason) must agree."""
    reference = block_matches(block, request)
    assert (block_mismatch(block, request) is None) is reference
    return reference


def vh(name, *routes):
    return VirtualHost(name=name, domains=(name,), routes=tuple(routes))


def route(name, *matches):
    return HttpRoute(name=name, source=f"test {name}", matches=tuple(matches),
                     destinations=(WeightedDestination("svc", None, None, 100, "c"),))


def exact(v, ic=False):
    return StringMatch("exact", v.lower() if ic else v, ignore_case=ic)


def prefix(v, ic=False):
    return StringMatch("prefix", v.lower() if ic else v, ignore_case=ic)


def regex(v):
    return StringMatch("regex", v, regex=re.compile(v))


def req(path="/", method="GET", headers=None, query="", authority="reviews:9080", port=9080, scheme="http"):
    return RequestView(method, authority, path, query, headers or {}, port, scheme, "10.0.0.1")


# ---------------------------------------------------------------- virtual host precedence


def table(**kw):
    return RouteTable(name="t", **kw)


def test_exact_domain_with_port_wins_over_domain_without_port():
    a, b = vh("a"), vh("b")
    t = table(exact=MappingProxyType({"reviews:9080": a, "reviews": b}))
    assert select_virtual_host(t, "reviews:9080") is a
    assert select_virtual_host(t, "reviews:80") is b


def test_exact_domain_wins_over_wildcard_and_default():
    a, w, d = vh("a"), vh("w"), vh("d")
    t = table(exact=MappingProxyType({"api.example.com": a}), wildcards=((".example.com", w),), default=d)
    assert select_virtual_host(t, "api.example.com:443") is a
    assert select_virtual_host(t, "www.example.com") is w


def test_longest_wildcard_suffix_wins():
    long, short = vh("long"), vh("short")
    t = table(wildcards=((".api.example.com", long), (".example.com", short)))
    assert select_virtual_host(t, "v1.api.example.com") is long
    assert select_virtual_host(t, "www.example.com:8080") is short


def test_wildcard_does_not_match_the_bare_suffix_and_unknown_host_gets_default():
    w, d = vh("w"), vh("d")
    t = table(wildcards=((".example.com", w),), default=d)
    assert select_virtual_host(t, "example.com") is d
    assert select_virtual_host(t, "other.org") is d
    assert select_virtual_host(table(), "other.org") is None


def test_many_wildcards_use_the_index_with_the_same_longest_first_precedence():
    vhosts = [vh(f"w{i}") for i in range(20)]
    wild = tuple((f".s{i}.example.com", vhosts[i]) for i in range(19)) + ((".example.com", vhosts[19]),)
    t = table(wildcards=wild)
    assert select_virtual_host(t, "a.s7.example.com") is vhosts[7]
    assert select_virtual_host(t, "a.b.example.com") is vhosts[19]
    assert select_virtual_host(t, "example.com") is None


def test_ipv6_authority_port_is_stripped():
    a = vh("a")
    t = table(exact=MappingProxyType({"[::1]": a}))
    assert select_virtual_host(t, "[::1]:8080") is a
    assert select_virtual_host(t, "[::1]") is a


# ---------------------------------------------------------------- route precedence


def test_first_matching_route_wins_even_if_a_later_one_is_more_specific():
    general = route("general", RouteMatch(uri=prefix("/")))
    specific = route("specific", RouteMatch(uri=exact("/reviews/1")))
    assert select_route(vh("v", general, specific), req("/reviews/1"))[0] is general


def test_route_without_matches_matches_everything_and_reports_no_block():
    catch_all = route("all")
    r, m = select_route(vh("v", route("x", RouteMatch(uri=exact("/x"))), catch_all), req("/y"))
    assert r is catch_all and m is None


def test_match_blocks_are_ored_and_the_matching_block_is_returned():
    b1, b2 = RouteMatch(name="one", uri=exact("/a")), RouteMatch(name="two", uri=exact("/b"))
    r = route("r", b1, b2)
    assert select_route(vh("v", r), req("/b")) == (r, b2)


def test_conditions_inside_a_block_are_anded():
    block = RouteMatch(uri=prefix("/api"), method=exact("POST"))
    r = route("r", block)
    assert select_route(vh("v", r), req("/api/x", "POST")) == (r, block)
    assert select_route(vh("v", r), req("/api/x", "GET")) is None


def test_no_route_matching_returns_none():
    assert select_route(vh("v", route("r", RouteMatch(uri=exact("/a")))), req("/b")) is None


# ---------------------------------------------------------------- each kind


@pytest.mark.parametrize("sm,path,ok", [
    (exact("/a"), "/a", True), (exact("/a"), "/a/", False), (exact("/A", ic=True), "/a", True),
    (exact("/a"), "/A", False), (prefix("/api"), "/api/v1", True), (prefix("/api"), "/ap", False),
    (prefix("/API", ic=True), "/api/v1", True), (regex(r"/r/\d+"), "/r/12", True),
    (regex(r"/r/\d+"), "/r/12/x", False), (regex(r"\d+"), "/a123", False),
])
def test_uri_match_kinds(sm, path, ok):
    assert both(RouteMatch(uri=sm), req(path)) is ok


def test_uri_match_ignores_the_query():
    assert both(RouteMatch(uri=exact("/a")), req("/a", query="x=1"))


@pytest.mark.parametrize("hm,headers,ok", [
    (HeaderMatch("end-user", exact("jason")), {"end-user": "jason"}, True),
    (HeaderMatch("end-user", exact("jason")), {"end-user": "bob"}, False),
    (HeaderMatch("end-user", exact("jason")), {}, False),
    (HeaderMatch("x-v", prefix("v2")), {"x-v": "v2.1"}, True),
    (HeaderMatch("x-v", regex(r"v\d")), {"x-v": "v2"}, True),
    (HeaderMatch("x-v", regex(r"v\d")), {"x-v": "xv2"}, False),
    (HeaderMatch("x-canary", None), {"x-canary": ""}, True),
    (HeaderMatch("x-canary", None), {}, False),
])
def test_header_match_kinds_and_presence(hm, headers, ok):
    assert both(RouteMatch(headers=(hm,)), req(headers=headers)) is ok


def test_without_headers_fails_the_block_if_any_of_them_matches():
    block = RouteMatch(without_headers=(HeaderMatch("x-debug", None), HeaderMatch("end-user", exact("bob"))))
    assert both(block, req(headers={"end-user": "jason"}))
    assert not both(block, req(headers={"x-debug": "1"}))
    assert not both(block, req(headers={"end-user": "bob"}))


def test_query_params_exact_regex_empty_value_and_absence():
    block = RouteMatch(query_params=(("id", regex(r"\d+")), ("debug", exact(""))))
    assert both(block, req(query="id=123&debug"))
    assert not both(block, req(query="id=a123&debug"))
    assert not both(block, req(query="id=123"))


def test_query_param_first_occurrence_counts():
    block = RouteMatch(query_params=(("v", exact("1")),))
    assert both(block, req(query="v=1&v=2"))
    assert not both(block, req(query="v=2&v=1"))


def test_method_authority_scheme_and_port_matches():
    assert both(RouteMatch(method=exact("DELETE")), req(method="DELETE"))
    assert both(RouteMatch(authority=prefix("reviews")), req(authority="reviews:9080"))
    assert not both(RouteMatch(authority=exact("reviews")), req(authority="reviews:9080"))
    assert both(RouteMatch(scheme=exact("https")), req(scheme="https"))
    assert not both(RouteMatch(port=8080), req(port=9080))


def test_source_labels_and_gateways_are_ignored_at_runtime():
    block = RouteMatch(source_labels=(("app", "other"),), gateways=("ns/gw",))
    assert both(block, req())


# ---------------------------------------------------------------- explain agrees with the fast path


CASES = [
    (RouteMatch(uri=exact("/a"), method=exact("GET")), req("/a", "POST")),
    (RouteMatch(headers=(HeaderMatch("end-user", exact("jason")),)), req(headers={"end-user": "bob"})),
    (RouteMatch(headers=(HeaderMatch("end-user", exact("jason")),)), req(headers={"end-user": "jason"})),
    (RouteMatch(headers=(HeaderMatch("x", None),)), req()),
    (RouteMatch(without_headers=(HeaderMatch("x", None),)), req(headers={"x": "1"})),
    (RouteMatch(query_params=(("q", exact("1")),)), req(query="q=2")),
    (RouteMatch(port=1), req()),
    (RouteMatch(scheme=exact("https"), authority=prefix("reviews")), req()),
]


@pytest.mark.parametrize("block,request_", CASES)
def test_mismatch_reason_is_given_exactly_when_the_block_does_not_match(block, request_):
    assert (block_mismatch(block, request_) is None) == both(block, request_)


def test_mismatch_reason_names_header_expected_and_actual_value():
    block = RouteMatch(headers=(HeaderMatch("end-user", exact("jason")),))
    assert block_mismatch(block, req(headers={"end-user": "bob"})) == 'header end-user exact "jason" != "bob"'


# ---------------------------------------------------------------- RequestView


def test_request_view_from_head_splits_query_lowercases_authority_and_joins_repeats():
    head = RequestHead(method=b"GET", target=b"/p?a=1", version=b"1.1",
                       headers=[(b"host", b"Reviews:9080"), (b"x-a", b"1"), (b"x-a", b"2"), (b"cookie", b"s=abc; t=1")],
                       host=b"Reviews:9080", path=b"/p?a=1", body_kind=0, content_length=-1,
                       keep_alive=True, upgrade=b"", expect_continue=False)
    view = RequestView.from_head(head, 9080, "http", "10.1.1.1")
    assert (view.method, view.authority, view.path, view.query) == ("GET", "reviews:9080", "/p", "a=1")
    assert view.headers["x-a"] == "1,2"
    assert view.query_params == {"a": "1"}
    assert view.cookie("s") == "abc" and view.cookie("zz") is None


def test_compiled_match_treats_values_and_names_as_data_not_code():
    odd = "x\"); raise SystemExit('no') #"
    block = RouteMatch(uri=exact(odd), headers=(HeaderMatch("we'ird", exact(odd)),))
    assert both(block, req(odd, headers={"we'ird": odd}))
    assert not both(block, req("/", headers={"we'ird": odd}))


def _reference_select(routes, request):
    """Istio's rule, written plainly: first route, first block that holds."""
    for r in routes:
        if not r.matches:
            return r, None
        for m in r.matches:
            if block_matches(m, request):
                return r, m
    return None


def test_compiled_selector_agrees_with_the_reference_on_random_routes_and_requests():
    import random
    rng = random.Random(20261130)
    conditions = [
        dict(uri=prefix("/api/")), dict(uri=exact("/login")), dict(uri=regex("/items/[0-9]+")),
        dict(uri=prefix("/API/", ic=True)), dict(method=exact("POST")),
        dict(headers=(HeaderMatch("x-canary", exact("true")),)),
        dict(headers=(HeaderMatch("x-user", prefix("tester-")),)),
        dict(headers=(HeaderMatch("x-user", exact("Tester-1", ic=True)),)),
        dict(headers=(HeaderMatch("x-trace", None),)),
        dict(headers=(HeaderMatch("end-user", regex("user[0-9]-.*")),)),
        dict(without_headers=(HeaderMatch("x-canary", exact("true")),)),
        dict(without_headers=(HeaderMatch("x-trace", None),)),
        dict(query_params=(("debug", exact("1")),)), dict(query_params=(("flag", exact("")),)),
        dict(authority=exact("other.example")), dict(scheme=exact("https")), dict(port=9080),
    ]
    requests = []
    for _ in range(60):
        headers = {}
        for name, values in (("x-canary", ["true", "false"]), ("x-user", ["tester-7", "Tester-1", "bob"]),
                             ("x-trace", ["1"]), ("end-user", ["user3-x", "user33", "jason"])):
            if rng.random() < 0.5:
                headers[name] = rng.choice(values)
        requests.append(req(rng.choice(["/api/v1", "/login", "/items/42", "/items/x", "/Api/z", "/"]),
                            method=rng.choice(["GET", "POST"]), headers=headers,
                            query=rng.choice(["", "debug=1", "flag", "debug=0&flag="]),
                            authority=rng.choice(["reviews:9080", "other.example"]),
                            port=rng.choice([9080, 80]), scheme=rng.choice(["http", "https"])))
    for trial in range(80):
        routes = []
        for i in range(rng.randint(1, 6)):
            blocks = tuple(RouteMatch(**{k: v for c in rng.sample(conditions, rng.randint(0, 3))
                                         for k, v in c.items()})
                           for _ in range(rng.randint(0 if i else 1, 3)))
            routes.append(route(f"r{trial}-{i}", *blocks))
        host = vh(f"h{trial}", *routes)
        for request in requests:
            got = select_route(host, request)
            want = _reference_select(host.routes, request)
            assert got == want, (trial, request, got, want)


def test_partial_wildcard_matches_any_prefix_longest_suffix_first_in_scans_and_in_large_tables():
    from meshproxy.config.model import RouteTable, VirtualHost
    partial, dotted, other = (VirtualHost(n, (), ()) for n in ("partial", "dotted", "other"))
    for extra in (0, 20):                        # 20 more wildcards: the table is past the scan limit
        fillers = [(f".filler{i}.net", other) for i in range(extra)]
        table = RouteTable("t", wildcards=tuple(sorted([("x.example.com", partial), (".example.com", dotted)]
                                                       + fillers, key=lambda kv: (-len(kv[0]), kv[0]))))
        assert select_virtual_host(table, "ax.example.com") is partial
        assert select_virtual_host(table, "a.b-x.example.com:8080") is partial
        assert select_virtual_host(table, "y.example.com") is dotted
        assert select_virtual_host(table, "x.example.com") is dotted      # "*x" needs at least one character
        assert select_virtual_host(table, "example.com") is None
