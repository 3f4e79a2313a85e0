"""After a busy loop pass, the worker's writes of the next leave together at its end;
after a light one, at once (meshproxy/batch.py).

Real sockets where the order on the wire is the point; a recording transport where the
point is *when* the bytes reach the transport (before or after the pass ends)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from helpers import parse_responses, raw_exchange
from inproc import cluster, snapshot, start_worker
from meshproxy import batch as batch_module
from meshproxy.batch import SendBatch
from meshproxy.codec import DEFAULT_BACKEND
from meshproxy.config.model import DirectResponse, HttpRoute
from meshproxy.downstream.http_conn import DownstreamConnection

pytestmark = pytest.mark.asyncio

GET = b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n"


class RecordingTransport:
    """What a connection hands its transport, in order: ("write", bytes), ("eof",),
    ("close",), ("abort",)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def written(self) -> bytes:
        return b"".join(c[1] for c in self.calls if c[0] == "write")

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, pieces):
        self.calls.append(("write", b"".join(pieces)))      # one vectored write

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return any(c[0] in ("close", "abort") for c in self.calls)

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.calls.append(("eof",))

    def close(self):
        self.calls.append(("close",))

    def abort(self):
        self.calls.append(("abort",))


async def _direct_worker(codec=DEFAULT_BACKEND):
    routes = [HttpRoute(name="dr", source="t", direct_response=DirectResponse(200, b"hi"))]
    return await start_worker(asyncio.get_running_loop(), snapshot(routes, [cluster("c", 9)]), codec)


def _connection(worker) -> tuple[DownstreamConnection, RecordingTransport]:
    conn = DownstreamConnection(worker.runtime, next(iter(worker.http_listeners.values())))
    transport = RecordingTransport()
    conn.connection_made(transport)
    return conn, transport


async def _end_of_pass():
    await asyncio.sleep(0)     # one turn of the loop: the batch's call_soon runs


async def test_answers_of_a_pass_after_a_busy_one_reach_the_transports_together_at_its_end(codec):
    worker, _ = await _direct_worker(codec)
    try:
        (a, ta), (b, tb) = _connection(worker), _connection(worker)
        worker.batch.deferring = True        # as after a pass that sent for > BUSY_PASS connections
        a.data_received(GET)
        b.data_received(GET + GET)           # two pipelined requests: one write for both answers
        assert ta.calls == [] and tb.calls == []          # nothing written inside the pass
        assert len(worker.batch.sends) == 2 and worker.batch.scheduled
        await _end_of_pass()
        assert [s for s, _, _ in parse_responses(ta.written())] == [200]
        assert [c[0] for c in tb.calls] == ["write"]
        assert [s for s, _, _ in parse_responses(tb.written())] == [200, 200]
        assert worker.batch.sends == [] and not worker.batch.scheduled
    finally:
        await worker.drain(1)


async def test_close_sends_the_held_answer_first_and_abort_drops_it():
    worker, _ = await _direct_worker()
    try:
        conn, transport = _connection(worker)
        worker.batch.deferring = True
        conn.data_received(GET)
        assert transport.calls == []
        conn.close()                          # e.g. the client's EOF in the same pass
        assert [c[0] for c in transport.calls] == ["write", "close"]
        assert parse_responses(transport.written())[0][0] == 200
        conn, transport = _connection(worker)
        worker.batch.deferring = True
        conn.data_received(GET)
        conn.abort()
        await _end_of_pass()
        assert transport.calls == [("abort",)]
    finally:
        await worker.drain(1)


async def test_a_pipelined_answer_goes_before_the_rejection_of_the_next_request(codec):
    """The first request is answered inside the read; the second in the same read is
    refused: the client gets both, in order, then the close."""
    worker, port = await _direct_worker(codec)
    try:
        smuggle = b"POST / HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        data, closed = await raw_exchange(port, GET + smuggle, timeout=2)
        assert [s for s, _, _ in parse_responses(data)] == [200, 400]
        assert closed
    finally:
        await worker.drain(1)


async def test_the_rejection_follows_the_held_pipelined_answer_in_one_write_then_eof():
    worker, _ = await _direct_worker()
    try:
        conn, transport = _connection(worker)
        worker.batch.deferring = True
        conn.data_received(GET + b"GET / HTTP/1.1\r\nHost: svc.local\r\nHost: other\r\n\r\n")
        assert [c[0] for c in transport.calls] == ["write", "eof"]
        assert [s for s, _, _ in parse_responses(transport.written())] == [200, 400]
    finally:
        await worker.drain(1)


async def test_sends_are_held_only_in_a_pass_after_a_busy_one():
    batch = SendBatch(asyncio.get_running_loop())
    sent = []
    batch.add(lambda: sent.append("light"))           # a light last pass (the start): at once
    assert sent == ["light"] and batch.scheduled      # the pass end still counts the pass
    for i in range(batch_module.BUSY_PASS):
        batch.add(lambda i=i: sent.append(i))
    assert len(sent) == batch_module.BUSY_PASS + 1 and batch.sends == []
    await _end_of_pass()                               # BUSY_PASS + 1 sends: a busy pass
    assert batch.deferring
    batch.add(lambda: sent.append("held"))
    assert sent[-1] != "held" and len(batch.sends) == 1
    await _end_of_pass()                               # one send: light again
    assert sent[-1] == "held" and not batch.deferring
    batch.add(lambda: sent.append("now"))
    assert sent[-1] == "now"
    await _end_of_pass()


async def test_a_send_that_fails_does_not_hold_back_the_others(caplog):
    batch = SendBatch(asyncio.get_running_loop())
    batch.deferring = True
    sent = []

    def broken():
        raise RuntimeError("transport gone")

    batch.add(lambda: sent.append("a"))
    batch.add(broken)
    batch.add(lambda: sent.append("c"))
    with caplog.at_level(logging.ERROR, logger="meshproxy"):
        await _end_of_pass()
    assert sent == ["a", "c"]
    assert "sending queued bytes failed" in caplog.text
    assert batch.sends == [] and not batch.scheduled


async def test_held_sends_go_in_order_and_one_added_while_sending_belongs_to_the_next_pass():
    loop = asyncio.get_running_loop()
    batch = SendBatch(loop)
    batch.deferring = True
    order = []
    batch.add(lambda: (order.append(1), batch.add(lambda: order.append(3))))
    batch.add(lambda: order.append(2))
    assert len(batch.sends) == 2 and order == []
    await _end_of_pass()
    # the held pass had 2 sends (light): the one added while sending went at once
    assert order == [1, 3, 2]
    assert batch.scheduled                   # and it counts toward the next pass, whose end comes next
    await _end_of_pass()
    assert not batch.scheduled and batch.sends == [] and not batch.deferring
