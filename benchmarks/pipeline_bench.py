"""Python cost of one proxied request, without sockets.

A real Worker (codec, router, split, cluster, pools, pipeline, telemetry) runs on a
hand-built snapshot; the downstream and upstream transports are fakes that record what
is written, so a loop can push a request in and the upstream's response back and
measure only the interpreter's share of a request (what wrk + /proc cannot separate
from kernel time and VM noise).

    .venv/bin/python benchmarks/pipeline_bench.py [--n 50000] [--trace] [--profile] [--asyncio-loop] [--realistic]
                                                  [--body-bytes 16384] [--chunked-response]

It runs on uvloop, as ``meshproxy run`` does (``--asyncio-loop`` for the stdlib loop).  Timings
on a shared VM drift by +-20%; ``benchmarks/instructions_per_request.sh`` counts instructions
under callgrind instead, which repeat exactly.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from inproc import cluster, dest, snapshot  # noqa: E402
from meshproxy.bootstrap import Worker, WorkerOptions  # noqa: E402
from meshproxy.codec import DEFAULT_BACKEND, make_response_parser  # noqa: E402
from meshproxy.config.decode import DEFAULT_RETRY_POLICY  # noqa: E402
from meshproxy.config.model import HttpRoute  # noqa: E402
from meshproxy.config.store import SnapshotStore  # noqa: E402
from meshproxy.downstream.http_conn import DownstreamConnection  # noqa: E402
from meshproxy.proxy.observe import Telemetry  # noqa: E402
from meshproxy.telemetry import ProxyTracer  # noqa: E402
from meshproxy.telemetry.tracing import IdSource  # noqa: E402
from meshproxy.upstream.connection import UpstreamConnection  # noqa: E402

REQUEST = (b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: bench/1.0\r\n"
           b"Accept: */*\r\nAccept-Encoding: gzip\r\nX-Request-Id: 7f1c9d2e-1b2a-4c3d-9e8f-001122334455\r\n"
           b"Cookie: session=abc\r\nConnection: keep-alive\r\n\r\n")
# what wrk sends (no x-request-id, no trace fields): the benchmark harness's request
PLAIN_REQUEST = b"GET /small HTTP/1.1\r\nHost: bench.local\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 06:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100)
# what run.py's upstream sends: nginx serving a static file (three more fields)
STATIC_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 06:00:00 GMT\r\n"
                   b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
                   b"Last-Modified: Mon, 30 Nov 2026 17:54:00 GMT\r\nConnection: keep-alive\r\n"
                   b"ETag: \"692c8388-64\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 100)


class FakeTransport:
    def __init__(self, peer=("127.0.0.1", 40000)):
        self.written = []
        self.peer = peer
        self.closing = False

    def write(self, data):
        self.written.append(data)

    def writelines(self, pieces):
        self.written.append(pieces)      # (the list is the connection's, reused: contents not kept)

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer, "socket": None}.get(name, default)

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass


def realistic_snapshot():
    """run.py's meshproxy-realistic config (benchmarks/lib/meshconfig.py) through the real
    load -> decode -> compile path: 50 services, 9 missed match routes, then 90/10 subsets."""
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
    import meshconfig
    from meshproxy.config.compile import ProxyIdentity
    from meshproxy.config.load import build_from_paths
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "realistic.yaml"
        path.write_text(meshconfig.realistic(9, 19, with_tcp=False))
        built = build_from_paths([str(path)], ProxyIdentity(http_listen=("127.0.0.1", 0)))
    assert built.snapshot is not None and not built.errors, built.errors
    return built.snapshot


async def main(n: int, trace: bool, profile: bool, request: bytes = REQUEST, realistic: bool = False,
               response: bytes = RESPONSE) -> None:
    loop = asyncio.get_running_loop()
    # as compiled from Istio YAML: a route without a retries block gets Istio's default policy
    snap = realistic_snapshot() if realistic else snapshot(
        [HttpRoute(name="r", source="t", destinations=(dest("c"),), retries=DEFAULT_RETRY_POLICY)],
        [cluster("c", 9)], domains=("bench.local",), port=0)
    # the production default id source (IdSource), with a fixed seed so that runs repeat
    tracer = ProxyTracer(None, sample_rate=0.01, rng=IdSource(bytes(range(32)))) if trace else None
    worker = Worker(loop, SnapshotStore(snap), WorkerOptions(), Telemetry(tracer=tracer), rng=random.Random(1))
    await worker.start()
    # one() ends each simulated loop pass by running the send batch itself, so the batch's
    # call_soon does nothing (``callable``: a C call, no handle).  Not counted therefore: the
    # one loop handle a real pass spends on its batch, shared by every connection it served.
    worker.batch.call_soon = callable
    listener = next(iter(worker.http_listeners.values()))
    down = DownstreamConnection(worker.runtime, listener)
    down.connection_made(FakeTransport())
    # one pooled upstream connection per endpoint, already connected (the realistic config's
    # v2 subset is 127.0.0.2)
    ups = []
    for address in ("127.0.0.1", "127.0.0.2") if realistic else ("127.0.0.1",):
        pool = worker.pools.pool((address, 9))
        up = UpstreamConnection(pool, lambda h: make_response_parser(DEFAULT_BACKEND, h, worker.options.limits),
                                worker.batch)
        up.connection_made(FakeTransport())
        up.requests = 1
        up.idle_since = worker.clock()
        pool.idle.append(up)
        ups.append(up)

    end_pass = worker.batch.run
    # upstream connections read as the loop has them read: get_buffer, the read into it,
    # buffer_updated.  Every upstream reads into one shared buffer: the response put there
    # once stays (the loop's recv into it is a system call, not counted either way).
    size = len(response)
    ups[0].get_buffer(-1)[:size] = response

    def one():
        # two loop passes (request in, response in), each ending by sending what it queued
        # (batch.py); a real pass under load serves several connections per batch run
        down.data_received(request)
        end_pass()
        for up in ups:
            if up.handler is not None:
                up.get_buffer(-1)
                up.buffer_updated(size)
        end_pass()

    for _ in range(2000):
        one()
    assert down.transport.written and all(up.transport.written for up in ups), (
        f"responses {len(down.transport.written)}, requests per upstream {[len(u.transport.written) for u in ups]}: "
        "with --realistic every subset must be reached (the browser-like request's /api/v1/ path matches a "
        "route to v2 only: use --wrk-request)")
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.process_time()
    for _ in range(n):
        one()
    elapsed = time.process_time() - t0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(int(__import__("os").environ.get("TOP", "25")))
    print(f"{elapsed / n * 1e6:.2f} us CPU per proxied request (Python only, no syscalls), "
          f"tracing {'on' if trace else 'off'}, n={n}")
    await worker.drain(0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--trace", action="store_true", help="trace propagation on (as `meshproxy run` by default)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--wrk-request", action="store_true",
                        help="the two-field request wrk sends instead of a browser-like one with x-request-id")
    parser.add_argument("--static-response", action="store_true",
                        help="the response run.py's upstream sends (nginx serving a static file: 8 fields, not 5)")
    parser.add_argument("--asyncio-loop", action="store_true", help="the stdlib loop instead of uvloop")
    parser.add_argument("--realistic", action="store_true",
                        help="run.py's realistic config (50 services, 9 missed match routes, 90/10 subsets)")
    parser.add_argument("--body-bytes", type=int, default=100,
                        help="response body size (run.py's large response: 16384), in one read")
    parser.add_argument("--chunked-response", action="store_true",
                        help="the response body as one chunk (Transfer-Encoding: chunked), not Content-Length")
    args = parser.parse_args()
    if not args.asyncio_loop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    response = STATIC_RESPONSE if args.static_response else RESPONSE
    if args.body_bytes != 100:
        head, _, _ = response.partition(b"\r\n\r\n")
        response = head.replace(b"Content-Length: 100", b"Content-Length: %d" % args.body_bytes) \
            + b"\r\n\r\n" + b"x" * args.body_bytes
    if args.chunked_response:
        head, _, body = response.partition(b"\r\n\r\n")
        head = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
        response = head + b"\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    asyncio.run(main(args.n, args.trace, args.profile, PLAIN_REQUEST if args.wrk_request else REQUEST,
                     args.realistic, response))
