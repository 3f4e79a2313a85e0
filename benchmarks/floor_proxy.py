"""The floor: the least an HTTP/1.1 keep-alive proxy on uvloop + httptools can do per request.

Not a product and not a baseline to ship: a yardstick for how much of meshproxy's cost per
request is the runtime (uvloop, llhttp, two reads and two writes) and how much is meshproxy.
It parses both directions with llhttp (field callbacks collecting (name, value), as any proxy
must), forwards the raw bytes unchanged over one upstream connection per client connection,
and does nothing else: no routing, no framing checks, no header rewriting, no telemetry, no
error handling.  Run by ``benchmarks/floor.sh``.

    .venv/bin/python benchmarks/floor_proxy.py UPSTREAM_PORT LISTEN_PORT
"""
import asyncio
import sys

import httptools
import uvloop


class _CollectFields:
    """llhttp callbacks every proxy needs at least: the fields of the message being parsed."""

    def on_header(self, name, value):
        self.fields.append((name, value))

    def on_message_complete(self):
        self.fields = []


class Upstream(_CollectFields, asyncio.Protocol):
    def __init__(self, down: "Downstream"):
        self.down = down
        self.fields: list = []
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed_data(data)
        self.down.transport.write(data)


class Downstream(_CollectFields, asyncio.Protocol):
    upstream_port = 0

    def __init__(self):
        self.fields: list = []
        self.upstream = None
        self.pending: list | None = []

    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self):
        _, self.upstream = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(self), "127.0.0.1", self.upstream_port)
        for data in self.pending:
            self.upstream.transport.write(data)
        self.pending = None

    def on_url(self, url):
        self.url = url

    def data_received(self, data):
        self.parser.feed_data(data)
        if self.pending is not None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.transport.close()


async def main(upstream_port: int, port: int) -> None:
    Downstream.upstream_port = upstream_port
    server = await asyncio.get_running_loop().create_server(Downstream, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
