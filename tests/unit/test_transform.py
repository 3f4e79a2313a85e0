"""Pure head transformations: forwarding fields, rewrites, header operations, redirects."""
from __future__ import annotations

import random
import re

from meshproxy.codec.api import BODY_NONE, RequestHead, ResponseHead
from meshproxy.config.model import (
    DirectResponse, FaultPolicy, HeaderOps, HttpRoute, Redirect, Rewrite, RouteMatch, StringMatch,
)
from meshproxy.proxy.transform import (
    apply_header_ops, client_fields, forwarded_request_headers, forwarded_response_headers, local_reply_for,
    rewrite_path_and_authority,
)


def head(path=b"/a/b?q=1", headers=(), host=b"svc.local", method=b"GET", upgrade=b""):
    return RequestHead(method=method, target=path, version=b"1.1", headers=[(b"host", host), *headers],
                       host=host, path=path, body_kind=BODY_NONE, content_length=-1, keep_alive=True,
                       upgrade=upgrade, expect_continue=False)


class View:
    def __init__(self, headers=None, scheme="http", port=80):
        self.headers = headers or {}
        self.scheme = scheme
        self.port = port


def test_connection_named_fields_are_removed_even_when_listed_before_connection():
    h = head(headers=[(b"x-a", b"1"), (b"connection", b"x-a, close"), (b"x-b", b"2")])
    out = forwarded_request_headers(h, b"svc.local", client_fields("10.1.1.1", "http"), lambda: b"id")
    names = [n for n, _ in out]
    assert b"x-a" not in names and b"connection" not in names
    assert (b"x-b", b"2") in out
    assert out[0] == (b"host", b"svc.local")


def test_several_x_forwarded_for_fields_are_joined_and_the_client_appended():
    h = head(headers=[(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2")])
    out = dict(forwarded_request_headers(h, b"svc.local", client_fields("3.3.3.3", "https"), lambda: b"id"))
    assert out[b"x-forwarded-for"] == b"1.1.1.1, 2.2.2.2, 3.3.3.3"
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-request-id"] == b"id"


def test_upgrade_request_keeps_its_upgrade_token():
    h = head(headers=[(b"connection", b"Upgrade"), (b"upgrade", b"websocket")], upgrade=b"websocket")
    out = forwarded_request_headers(h, b"svc.local", client_fields("1.1.1.1", "http"), lambda: b"id")
    assert (b"connection", b"upgrade") in out and (b"upgrade", b"websocket") in out


def test_response_hop_by_hop_removed_and_close_announced():
    r = ResponseHead(200, b"OK", b"1.1", [(b"keep-alive", b"timeout=5"), (b"connection", b"keep-alive"),
                                          (b"content-length", b"3"), (b"x-app", b"1")], 1, 3, True)
    out = forwarded_response_headers(r, (b"content-length", b"3"), keep_alive=False)
    assert out == [(b"x-app", b"1"), (b"content-length", b"3"), (b"connection", b"close")]


def test_header_operations_set_replaces_add_appends_remove_deletes():
    headers = [(b"x-a", b"old"), (b"x-b", b"b"), (b"x-gone", b"g")]
    ops = HeaderOps(set=(("X-A", "new"),), add=(("x-b", "b2"),), remove=("x-gone",))
    assert apply_header_ops(headers, ops) == [(b"x-b", b"b"), (b"x-a", b"new"), (b"x-b", b"b2")]


def test_prefix_rewrite_replaces_only_the_matched_prefix_and_keeps_the_query():
    route = HttpRoute(name="r", source="s", rewrite=Rewrite(uri="/v2/", authority="new.local"))
    match = RouteMatch(uri=StringMatch("prefix", "/a/"))
    path, authority = rewrite_path_and_authority(route, match, head())
    assert path == b"/v2/b?q=1" and authority == b"new.local"


def test_regex_rewrite():
    route = HttpRoute(name="r", source="s", rewrite=Rewrite(uri_regex=re.compile(r"^/a/(.*)$"),
                                                           uri_regex_rewrite=r"/x/\1"))
    path, _ = rewrite_path_and_authority(route, None, head())
    assert path == b"/x/b?q=1"


def test_redirect_builds_location_with_scheme_authority_and_code():
    route = HttpRoute(name="r", source="s", redirect=Redirect(uri="/new", authority="other.local", scheme="https", code=308))
    kind, (status, headers, body, flag) = local_reply_for(route, None, head(), View(), random.Random(1))
    assert kind == "reply" and status == 308
    assert headers == [(b"location", b"https://other.local/new?q=1")]


def test_direct_response_and_abort_fault():
    route = HttpRoute(name="r", source="s", direct_response=DirectResponse(418, b"teapot"))
    _, (status, _, body, _) = local_reply_for(route, None, head(), View(), random.Random(1))
    assert (status, body) == (418, b"teapot")
    route = HttpRoute(name="r", source="s", fault=FaultPolicy(abort_status=503, abort_percentage=100.0))
    _, (status, _, _, flag) = local_reply_for(route, None, head(), View(), random.Random(1))
    assert (status, flag) == (503, "FI")


def test_fault_percentages_follow_the_rng():
    route = HttpRoute(name="r", source="s", fault=FaultPolicy(abort_status=500, abort_percentage=30.0))
    rng = random.Random(7)
    hits = sum(local_reply_for(route, None, head(), View(), rng) is not None for _ in range(10_000))
    assert 2700 < hits < 3300


def test_delay_fault_comes_before_abort_and_abort_is_checked_after_the_delay():
    route = HttpRoute(name="r", source="s", fault=FaultPolicy(delay=0.2, delay_percentage=100.0,
                                                                abort_status=500, abort_percentage=100.0))
    assert local_reply_for(route, None, head(), View(), random.Random(1)) == ("delay", 0.2)
    kind, (status, *_rest) = local_reply_for(route, None, head(), View(), random.Random(1), after_delay=True)
    assert status == 500


def _cors_route(**cors):
    from meshproxy.config.model import CorsPolicy
    policy = CorsPolicy(allow_origins=(StringMatch("exact", "https://app.example.com"),), allow_methods=("GET", "PUT"),
                        allow_headers=("x-token",), expose_headers=("x-trace",), max_age=600.0, allow_credentials=True,
                        **cors)
    return HttpRoute(name="r", source="s", cors=policy)


PREFLIGHT = head(method=b"OPTIONS")


def test_a_matching_preflight_is_answered_with_the_policy_and_responses_get_cors_fields():
    from meshproxy.proxy.transform import cors_response_headers
    route = _cors_route()
    view = View({"origin": "https://app.example.com", "access-control-request-method": "PUT"})
    kind, (status, headers, body, _) = local_reply_for(route, None, PREFLIGHT, view, random.Random(1))
    assert (kind, status, body) == ("reply", 200, b"")
    assert headers == [(b"access-control-allow-origin", b"https://app.example.com"),
                       (b"access-control-allow-methods", b"GET,PUT"), (b"access-control-allow-headers", b"x-token"),
                       (b"access-control-max-age", b"600"), (b"access-control-allow-credentials", b"true")]
    assert cors_response_headers(route.cors, "https://app.example.com") == [
        (b"access-control-allow-origin", b"https://app.example.com"), (b"access-control-expose-headers", b"x-trace"),
        (b"access-control-allow-credentials", b"true")]
    assert cors_response_headers(route.cors, "https://evil.example.com") == []
    # an OPTIONS without Access-Control-Request-Method is no preflight: it goes to the upstream
    assert local_reply_for(route, None, PREFLIGHT, View({"origin": "https://app.example.com"}),
                           random.Random(1)) is None


def test_a_preflight_the_policy_does_not_match_is_forwarded_unless_ignored():
    view = View({"origin": "https://evil.example.com", "access-control-request-method": "PUT"})
    assert local_reply_for(_cors_route(), None, PREFLIGHT, view, random.Random(1)) is None     # FORWARD (default)
    kind, (status, headers, _, _) = local_reply_for(_cors_route(forward_unmatched_preflights=False), None, PREFLIGHT,
                                                    view, random.Random(1))
    assert (kind, status, headers) == ("reply", 200, [])
