"""Microseconds per message for each codec backend (parse only, handler does nothing).

    .venv/bin/python benchmarks/codec_bench.py [--n 20000]

GET is the request fast path (one Host, no framing fields); POST carries Content-Length and
Connection (the C-level dispatch path).  Measured on the shared 2-core dev box, httptools,
best of 5 (noisy, +-0.2 us):

    before (88d5df1)   GET 5.2 us   POST 5.2 us   response 4.0 us
    after              GET 3.9 us   POST 4.6 us   response 3.4 us
    floor: llhttp with no-op callbacks, same GET ~0.9 us
"""
from __future__ import annotations

import argparse
import time

from meshproxy.codec import BACKENDS, make_request_parser, make_response_parser
from meshproxy.codec.api import CodecLimits

REQUEST = (b"GET /api/v1/reviews/123?x=1 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\n"
           b"User-Agent: curl/8.5.0\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n"
           b"X-Request-Id: 3f2a9c1e-8b7d-4c6a-9e0f-1a2b3c4d5e6f\r\nX-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\n"
           b"X-B3-SpanId: e457b5a2e4d86bd1\r\nCookie: session=abc123\r\n\r\n")
_BODY = b'{"id":123,"reviews":[1,2]}'
POST = (b"POST /api/v1/reviews HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\n"
        b"User-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(_BODY)) + _BODY
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: envoy\r\nX-Envoy-Upstream-Service-Time: 3\r\n"
            b"\r\n" % len(_BODY)) + _BODY


class Null:
    def on_request_head(self, head): pass
    def on_response_head(self, head): pass
    def on_body(self, data): pass
    def on_message_complete(self): pass


def bench(make, backend: str, data: bytes, n: int) -> float:
    parser = make(backend, Null(), CodecLimits())
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            parser.feed(data)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    for backend in BACKENDS:
        n = args.n if backend != "h11" else max(1, args.n // 10)
        req = bench(make_request_parser, backend, REQUEST, n)
        post = bench(make_request_parser, backend, POST, n)
        resp = bench(make_response_parser, backend, RESPONSE, n)
        print(f"{backend:10s} request (8 fields, GET): {req:7.2f} us   POST (CL body): {post:7.2f} us   "
              f"response (CL body): {resp:7.2f} us")


if __name__ == "__main__":
    main()
