"""The sidecar's DNS listener (default 127.0.0.1:15053; ``pod-init --capture-dns`` sends the pod's
port-53 traffic to it), like Istio's DNS proxy.

* A/AAAA queries for mesh names (``reviews``, ``reviews.default``, ``reviews.default.svc``,
  ``reviews.default.svc.cluster.local``, ServiceEntry hosts) are answered from the snapshot with
  the services' virtual IPs (TTL :data:`MESH_TTL`).  A mesh name without an address of the asked
  family gets an empty NOERROR answer (never NXDOMAIN, which would also fail the other family).
* Every other query is forwarded to the pod's original resolvers (``/etc/resolv.conf``'s
  ``nameserver`` lines, read at start), one after another, each under a timeout; no answer is
  SERVFAIL.  Answers are cached (bounded LRU, TTL = the answer's smallest TTL, at most
  :data:`MAX_CACHE_TTL`; negative answers :data:`NEGATIVE_TTL`).
* Bad input: a message that does not parse gets FORMERR (when it has a header to answer), a
  query over :data:`MAX_QUERY_BYTES` FORMERR, anything that is not a query (QR set, opcode
  other than QUERY) NOTIMP; more than ``max_inflight`` forwarded queries at once: REFUSED for
  the excess (a flood cannot queue without bound); TCP connections have an idle timeout.

The wire format is dnspython's (``dns.message``); only the listening and forwarding is here.
The sidecar's forwarded queries leave as the proxy's uid, which ``pod-init`` never captures.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import OrderedDict
from typing import Callable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("meshproxy.dns")

MESH_TTL = 30
MAX_CACHE_TTL = 300
NEGATIVE_TTL = 30
MAX_QUERY_BYTES = 4096
TCP_IDLE_TIMEOUT = 10.0


def resolv_conf_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    servers = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append((parts[1], 53))
    except OSError:
        pass
    return servers


def _error_reply(wire: bytes, rcode: int) -> bytes | None:
    """An answer with only the header (id and opcode of the query) and ``rcode``; None when
    there is not even a header to answer."""
    if len(wire) < 12:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    opcode_bits = flags & 0x7800
    rd = flags & 0x0100
    return struct.pack("!HHHHHH", qid, 0x8000 | opcode_bits | rd | 0x0080 | (rcode & 0xF), 0, 0, 0, 0)


class DnsCache:
    """Bounded LRU of forwarded answers keyed by (name, type, class), expiring by TTL."""

    def __init__(self, size: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[tuple, tuple[float, bytes]] = OrderedDict()

    def get(self, key: tuple) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, wire = entry
        if self.clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return wire

    def put(self, key: tuple, wire: bytes, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (self.clock() + ttl, wire)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class DnsResolver:
    """Answers one query (wire bytes in, wire bytes out); transport-independent."""

    def __init__(self, names: Callable[[], Mapping[str, tuple[str, ...]]], upstreams: list[tuple[str, int]],
                 timeout: float = 2.0, cache_size: int = 1024, max_inflight: int = 256):
        self.names = names
        self.upstreams = upstreams
        self.timeout = timeout
        self.cache = DnsCache(cache_size)
        self.max_inflight = max_inflight
        self.inflight = 0
        self.stats = {"mesh": 0, "forwarded": 0, "cached": 0, "servfail": 0, "formerr": 0, "refused": 0,
                      "notimp": 0}

    async def answer(self, wire: bytes, tcp: bool = False) -> bytes | None:
        if len(wire) > MAX_QUERY_BYTES:
            self.stats["formerr"] += 1
            return _error_reply(wire, dns.rcode.FORMERR)
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error):
            self.stats["formerr"] += 1
            return _error_reply(wire, dns.rcode.FORMERR)
        if query.flags & dns.flags.QR or query.opcode() != dns.opcode.QUERY:
            self.stats["notimp"] += 1
            return _error_reply(wire, dns.rcode.NOTIMP)
        if len(query.question) != 1:
            self.stats["formerr"] += 1
            return _error_reply(wire, dns.rcode.FORMERR)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        addresses = self.names().get(name) if q.rdclass == dns.rdataclass.IN else None
        if addresses is not None:
            self.stats["mesh"] += 1
            return self._mesh_answer(query, q, addresses, tcp)
        key = (name, q.rdtype, q.rdclass)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats["cached"] += 1
            return wire[:2] + cached[2:]
        if self.inflight >= self.max_inflight:
            self.stats["refused"] += 1
            return _error_reply(wire, dns.rcode.REFUSED)
        self.inflight += 1
        try:
            reply = await self._forward(wire, tcp)
        finally:
            self.inflight -= 1
        if reply is None:
            self.stats["servfail"] += 1
            return _error_reply(wire, dns.rcode.SERVFAIL)
        self.stats["forwarded"] += 1
        self._remember(key, reply)
        return wire[:2] + reply[2:]

    def _mesh_answer(self, query, q, addresses: tuple[str, ...], tcp: bool) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            v6 = q.rdtype == dns.rdatatype.AAAA
            chosen = [a for a in addresses if (":" in a) == v6]
            if chosen:
                response.answer.append(dns.rrset.from_text_list(q.name, MESH_TTL, dns.rdataclass.IN, q.rdtype, chosen))
        try:
            return response.to_wire(max_size=65535 if tcp else 512)
        except dns.exception.TooBig:          # over UDP: truncated, the client retries over TCP
            response.answer = []
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _remember(self, key: tuple, reply: bytes) -> None:
        try:
            message = dns.message.from_wire(reply)
        except dns.exception.DNSException:
            return
        rcode = message.rcode()
        if rcode == dns.rcode.NXDOMAIN or (rcode == dns.rcode.NOERROR and not message.answer):
            self.cache.put(key, reply, NEGATIVE_TTL)
        elif rcode == dns.rcode.NOERROR and not message.flags & dns.flags.TC:
            ttl = min(rrset.ttl for rrset in message.answer)
            self.cache.put(key, reply, min(ttl, MAX_CACHE_TTL))

    async def _forward(self, wire: bytes, tcp: bool) -> bytes | None:
        for host, port in self.upstreams:
            try:
                if tcp:
                    reply = await asyncio.wait_for(_tcp_exchange(host, port, wire), self.timeout)
                else:
                    reply = await asyncio.wait_for(_udp_exchange(host, port, wire), self.timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as err:
                log.debug("DNS upstream %s:%d: %s", host, port, err)
                continue
            if reply is not None and len(reply) >= 12 and reply[:2] == wire[:2]:
                return reply
        return None


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, wire: bytes):
        self.wire = wire
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        transport.sendto(self.wire)

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.done.done() and data[:2] == self.wire[:2]:
            self.done.set_result(data)

    def error_received(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _udp_exchange(host: str, port: int, wire: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _UdpExchange(wire), remote_addr=(host, port))
    try:
        return await proto.done
    finally:
        transport.close()


async def _tcp_exchange(host: str, port: int, wire: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        length, = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, server: "DnsServer"):
        self.server = server
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.server.spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr) -> None:
        reply = await self.server.resolver.answer(data)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class DnsServer:
    """UDP and TCP listeners on one address; owns the tasks answering queries."""

    def __init__(self, resolver: DnsResolver, host: str = "127.0.0.1", port: int = 15053):
        self.resolver = resolver
        self.host = host
        self.port = port
        self.udp = None
        self.tcp: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(self), local_addr=(self.host, self.port),
                                                          family=family)
        self.port = self.udp.get_extra_info("sockname")[1]
        self.tcp = await asyncio.start_server(self._tcp_client, self.host, self.port, reuse_address=True)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length, = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT))
                wire = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                reply = await self.resolver.answer(wire, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
        for task in list(self.tasks):
            task.cancel()
