"""Throughput of one bulk TCP transfer through the L4 proxy vs direct, on loopback.

    .venv/bin/python benchmarks/tcp_bench.py                 # 1 GiB, each way measured once
    .venv/bin/python benchmarks/tcp_bench.py --size-mib 256 --runs 3 --high-water 1048576

Three processes on uvloop: a sink (reads and discards, answers the byte count at EOF),
the proxy (a TcpProxyListener, its own process so it gets its own core), and the
client in this process, which writes ``size`` bytes from one reused 1 MiB buffer with
pause_writing/resume_writing flow control. Time is from connect to the sink's answer,
so it includes draining every buffer. Not part of the test suite.

Measured (2 shared cores, Python 3.11.7, uvloop 0.23.0, 1 GiB, two runs each):

    direct                      ~4500-4600 MB/s
    proxied, high-water 256 KiB ~2150 MB/s   (default)
    proxied, high-water 64 KiB  ~1970-2310 MB/s
    proxied, high-water 1 MiB   ~1770-2070 MB/s
    proxied, high-water 4 MiB   ~1690-1970 MB/s

A larger proxy buffer does not help: the splice is one write per read and the
kernel's loopback copies dominate; 256 KiB stays the default.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import uvloop  # noqa: E402

from meshproxy.downstream.tcp_proxy import TcpProxyListener  # noqa: E402

CHUNK = 1 << 20


class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.n = 0

    def data_received(self, data):
        self.n += len(data)

    def eof_received(self):
        self.transport.write(str(self.n).encode())
        self.transport.close()
        return True


def run_sink(q):
    async def main():
        server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0)
        q.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()
    uvloop.run(main())


def run_proxy(q, sink_port, high_water):
    async def main():
        loop = asyncio.get_running_loop()
        listener = TcpProxyListener(loop, lambda: ("127.0.0.1", sink_port), connect_timeout=2.0,
                                    idle_timeout=60.0, high_water=high_water,
                                    low_water=high_water // 4)
        server = await loop.create_server(listener, "127.0.0.1", 0)
        q.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()
    uvloop.run(main())


class Pusher(asyncio.Protocol):
    def __init__(self, size, done):
        self.left = size
        self.done = done
        self.block = b"\x5a" * CHUNK
        self.paused = False
        self.answer = b""

    def connection_made(self, transport):
        self.transport = transport
        self.push()

    def push(self):
        t = self.transport
        while self.left > 0 and not self.paused:
            n = min(CHUNK, self.left)
            t.write(self.block if n == CHUNK else self.block[:n])
            self.left -= n
        if self.left == 0 and not self.paused and t.can_write_eof():
            t.write_eof()
            self.left = -1

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.push()

    def data_received(self, data):
        self.answer += data

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(self.answer)


async def transfer(port, size) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    t0 = time.perf_counter()
    await loop.create_connection(lambda: Pusher(size, done), "127.0.0.1", port)
    answer = await done
    elapsed = time.perf_counter() - t0
    if int(answer or b"0") != size:
        raise SystemExit(f"sink counted {answer!r} bytes, expected {size}")
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--high-water", type=int, default=256 * 1024,
                    help="proxy write-buffer high-water mark in bytes (low = high/4)")
    args = ap.parse_args()
    size = args.size_mib << 20
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    sink = ctx.Process(target=run_sink, args=(q,), daemon=True)
    sink.start()
    sink_port = q.get(timeout=10)
    proxy = ctx.Process(target=run_proxy, args=(q, sink_port, args.high_water), daemon=True)
    proxy.start()
    proxy_port = q.get(timeout=10)
    try:
        for run in range(args.runs):
            for name, port in (("direct", sink_port), ("proxied", proxy_port)):
                elapsed = uvloop.run(transfer(port, size))
                print(f"run {run + 1} {name:8s} {args.size_mib} MiB in {elapsed:6.2f} s = "
                      f"{size / elapsed / 1e6:8.1f} MB/s", flush=True)
    finally:
        proxy.terminate()
        sink.terminate()


if __name__ == "__main__":
    main()
