"""Where the interpreter's work per proxied request goes: bytecodes and calls per function.

Runs the same in-process request loop as ``pipeline_bench.py`` (real Worker, fake transports)
under ``sys.settrace`` with opcode events, and prints, per proxied request, the bytecodes each
Python function executed itself (not its callees), how often it was called, and the totals by
package (``proxy``, ``codec``, ``downstream``...).  Deterministic: the counts repeat exactly, so
two versions of a function can be compared without timing noise.  Bytecodes are not equally
expensive (a slot store is cheap, a call or a bytes join is not), so confirm a change with
``instructions_per_request.sh``, which counts machine instructions including C code.

    .venv/bin/python benchmarks/bytecodes_per_request.py [--wrk-request] [--trace] [--top 45]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_bench as bench  # noqa: E402
from meshproxy.codec import DEFAULT_BACKEND, make_response_parser  # noqa: E402

_ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def _where(code) -> str:
    return f"{code.co_filename.replace(_ROOT, '')}:{code.co_firstlineno}({code.co_name})"


async def count(requests: int, trace: bool, request: bytes) -> tuple[collections.Counter, collections.Counter]:
    loop = asyncio.get_running_loop()
    snap = bench.snapshot(
        [bench.HttpRoute(name="r", source="t", destinations=(bench.dest("c"),), retries=bench.DEFAULT_RETRY_POLICY)],
        [bench.cluster("c", 9)], domains=("bench.local",), port=0)
    tracer = bench.ProxyTracer(None, sample_rate=0.01, rng=random.Random(1)) if trace else None
    worker = bench.Worker(loop, bench.SnapshotStore(snap), bench.WorkerOptions(), bench.Telemetry(tracer=tracer),
                          rng=random.Random(1))
    await worker.start()
    worker.batch.call_soon = callable     # one() ends each pass itself (see pipeline_bench.py)
    listener = next(iter(worker.http_listeners.values()))
    down = bench.DownstreamConnection(worker.runtime, listener)
    down.connection_made(bench.FakeTransport())
    pool = worker.pools.pool(("127.0.0.1", 9))
    up = bench.UpstreamConnection(pool, lambda h: make_response_parser(DEFAULT_BACKEND, h, worker.options.limits),
                                  worker.batch)
    up.connection_made(bench.FakeTransport())
    up.requests = 1
    up.idle_since = worker.clock()
    pool.idle.append(up)

    end_pass = worker.batch.run

    def one() -> None:          # two loop passes: each ends by sending what it queued
        down.data_received(request)
        end_pass()
        up.data_received(bench.RESPONSE)
        end_pass()
        down.transport.written.clear()
        up.transport.written.clear()

    for _ in range(2000):      # warm: specialised bytecode, memo tables, pooled connection
        one()
    opcodes: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def on_call(frame, event, arg):
        where = _where(frame.f_code)
        calls[where] += 1
        frame.f_trace_opcodes = True

        def on_event(frame, event, arg):
            if event == "opcode":
                opcodes[where] += 1
            return on_event
        return on_event

    sys.settrace(on_call)
    for _ in range(requests):
        one()
    sys.settrace(None)
    await worker.drain(0.1)
    return opcodes, calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--trace", action="store_true", help="trace propagation on")
    parser.add_argument("--wrk-request", action="store_true", help="wrk's two-field request")
    parser.add_argument("--top", type=int, default=45)
    args = parser.parse_args()
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    opcodes, calls = asyncio.run(count(args.n, args.trace, bench.PLAIN_REQUEST if args.wrk_request else bench.REQUEST))
    n = args.n
    harness = [k for k in opcodes if k.startswith("benchmarks/")]
    for k in harness:                       # the loop driving the requests is not the proxy's work
        del opcodes[k]
        calls.pop(k, None)
    flags = " ".join(f for f, on in (("--wrk-request", args.wrk_request), ("--trace", args.trace)) if on)
    print(f"per proxied request: {sum(opcodes.values()) / n:.0f} bytecodes in {sum(calls.values()) / n:.0f} "
          f"Python calls (the request loop of pipeline_bench.py {flags})".replace(" )", ")"))
    by_package: collections.Counter = collections.Counter()
    package_calls: collections.Counter = collections.Counter()
    for where, count_ in opcodes.items():
        if where.startswith("<string>"):
            package = "generated __init__ (RequestHead, ResponseHead dataclasses)"
        else:
            package = where.split("/")[1] if where.count("/") > 1 else where.split(":")[0]
        by_package[package] += count_
        package_calls[package] += calls[where]
    print("\nby package:")
    for package, count_ in by_package.most_common():
        print(f"{count_ / n:8.0f} bytecodes {package_calls[package] / n:5.1f} calls  {package}")
    print(f"\ntop {args.top} functions (own bytecodes, calls):")
    for where, count_ in opcodes.most_common(args.top):
        print(f"{count_ / n:8.1f} {calls[where] / n:5.1f}  {where}")


if __name__ == "__main__":
    main()
