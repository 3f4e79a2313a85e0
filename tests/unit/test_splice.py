"""Splice logic against recording fake transports and a manual clock: the handover
contract, flow-control bookkeeping, half-close order, reset propagation, idle check.
(The same behaviour on real sockets: tests/integration/test_tcp_proxy.py.)"""
from __future__ import annotations

import pytest

from meshproxy.downstream.splice import Splice


class FakeTransport:
    def __init__(self, name: str, *, can_eof: bool = True, closing: bool = False):
        self.name = name
        self.calls: list[str] = []
        self.written = b""
        self.protocol = None
        self.reading = False          # the old protocol paused it
        self.closing = closing
        self.can_eof = can_eof
        self.eof_written = False
        self.buffer = 0
        self.limits = None
        self.lingered = False

    def set_protocol(self, protocol):
        self.protocol = protocol
        self.calls.append("set_protocol")

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = (high, low)

    def get_write_buffer_size(self):
        return self.buffer

    def write(self, data):
        assert not self.closing and not self.eof_written, f"{self.name}: write after close/eof"
        self.written += data
        self.calls.append("write")

    def can_write_eof(self):
        return self.can_eof

    def write_eof(self):
        self.eof_written = True
        self.calls.append("write_eof")

    def pause_reading(self):
        self.reading = False
        self.calls.append("pause_reading")

    def resume_reading(self):
        self.reading = True
        self.calls.append("resume_reading")

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True
        self.calls.append("close")

    def abort(self):
        self.closing = True
        self.calls.append("abort")

    def get_extra_info(self, name, default=None):
        if name == "socket":
            return self
        return default

    def setsockopt(self, level, opt, value):
        self.lingered = True


class ManualLoop:
    def __init__(self):
        self.now = 100.0
        self.timers: list[list] = []

    def time(self):
        return self.now

    def call_later(self, delay, cb):
        timer = [self.now + delay, cb, False]

        class Handle:
            def cancel(self_inner):
                timer[2] = True
        self.timers.append(timer)
        return Handle()

    def advance(self, seconds):
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t[2] and t[0] <= end]
            if not due:
                break
            t = min(due, key=lambda t: t[0])
            self.timers.remove(t)
            self.now = t[0]
            t[1]()
        self.now = end

    @property
    def pending(self):
        return [t for t in self.timers if not t[2]]


def make(**kw):
    loop = ManualLoop()
    down = kw.pop("down", None) or FakeTransport("down")
    up = kw.pop("up", None) or FakeTransport("up")
    closes = []
    splice = Splice(loop, down, up, on_close=lambda s, r: closes.append((s, r)), **kw)
    return loop, down, up, splice, closes


def lose_both(splice, exc=None):
    splice.downstream.connection_lost(exc)
    splice.upstream.connection_lost(exc)


# ------------------------------------------------------------------ handover


def test_start_installs_endpoints_writes_early_bytes_and_resumes_reading_on_both():
    loop, down, up, splice, _ = make(initial_to_upstream=b"client-early",
                                     initial_to_downstream=b"server-early",
                                     high_water=1000, low_water=100)
    splice.start()
    assert down.protocol is splice.downstream and up.protocol is splice.upstream
    assert up.written == b"client-early" and down.written == b"server-early"
    assert down.reading and up.reading          # were paused by the old protocols
    assert down.limits == up.limits == (1000, 100)
    assert (splice.sent, splice.received) == (12, 12)
    for t in (down, up):
        assert t.calls.index("write") < t.calls.index("resume_reading")


def test_start_twice_is_refused():
    _, _, _, splice, _ = make()
    splice.start()
    with pytest.raises(RuntimeError):
        splice.start()


def test_watermarks_out_of_order_are_refused():
    with pytest.raises(ValueError):
        make(high_water=10, low_water=20)


def test_eof_seen_before_handover_is_forwarded_after_the_early_bytes():
    _, down, up, splice, _ = make(initial_to_upstream=b"last words", downstream_eof=True)
    splice.start()
    assert up.written == b"last words"
    assert up.calls.index("write") < up.calls.index("write_eof")
    assert not down.reading                     # nothing more to read from the client
    assert up.reading and not up.closing         # the answer can still come back


def test_side_already_closing_at_handover_closes_the_other_after_its_early_bytes():
    up = FakeTransport("up", closing=True)
    _, down, up, splice, closes = make(up=up, initial_to_downstream=b"goodbye")
    splice.start()
    assert down.written == b"goodbye"
    assert down.calls[-1] == "close"
    splice.downstream.connection_lost(None)
    splice.upstream.connection_lost(None)        # the late real callback is ignored
    assert closes == [(0, 7)]


# ------------------------------------------------------------------ relay and flow control


def test_bytes_read_on_one_side_are_written_to_the_other_and_counted():
    _, down, up, splice, _ = make()
    splice.start()
    splice.downstream.data_received(b"abc")
    splice.upstream.data_received(b"12345")
    assert up.written == b"abc" and down.written == b"12345"
    assert (splice.sent, splice.received) == (3, 5)


def test_full_upstream_buffer_pauses_downstream_reading_until_it_drains():
    _, down, up, splice, _ = make()
    splice.start()
    splice.upstream.pause_writing()
    splice.upstream.pause_writing()              # repeated signal counts once
    assert not down.reading and up.reading
    splice.upstream.resume_writing()
    assert down.reading
    splice.upstream.resume_writing()             # spurious resume changes nothing
    assert (splice.pauses, splice.resumes) == (1, 1)


def test_full_downstream_buffer_pauses_upstream_reading():
    _, down, up, splice, _ = make()
    splice.start()
    splice.downstream.pause_writing()
    assert not up.reading and down.reading
    splice.downstream.resume_writing()
    assert up.reading
    assert (splice.pauses, splice.resumes) == (1, 1)


def test_buffer_full_already_at_handover_keeps_that_side_paused():
    _, down, up, splice, _ = make()
    # set_write_buffer_limits on a transport over the mark calls pause_writing at once
    up.set_write_buffer_limits = lambda high=None, low=None: splice.upstream.pause_writing()
    splice.start()
    assert not down.reading and up.reading
    splice.upstream.resume_writing()
    assert down.reading


# ------------------------------------------------------------------ half-close


def test_downstream_fin_half_closes_upstream_and_the_other_direction_keeps_flowing():
    _, down, up, splice, closes = make()
    splice.start()
    assert splice.downstream.eof_received() is True   # keep the transport open
    assert up.eof_written and not up.closing and not down.closing
    splice.upstream.data_received(b"late answer")
    assert down.written == b"late answer"
    assert splice.upstream.eof_received() is True
    assert down.eof_written
    assert down.closing and up.closing and closes == []
    lose_both(splice)
    assert closes == [(0, 11)]


def test_transport_that_cannot_half_close_makes_the_splice_close_both_gracefully():
    up = FakeTransport("up", can_eof=False)
    _, down, up, splice, _ = make(up=up)
    splice.start()
    splice.downstream.eof_received()
    assert up.calls[-1] == "close" and down.calls[-1] == "close"


# ------------------------------------------------------------------ resets


def test_side_lost_with_an_error_resets_the_other_with_linger_zero():
    _, down, up, splice, closes = make()
    splice.start()
    splice.upstream.connection_lost(ConnectionResetError())
    assert down.calls[-1] == "abort" and down.lingered
    assert splice.reset_by is splice.upstream
    splice.downstream.connection_lost(None)
    assert closes == [(0, 0)]


def test_side_lost_cleanly_closes_the_other_gracefully():
    _, down, up, splice, _ = make()
    splice.start()
    splice.downstream.connection_lost(None)
    assert up.calls[-1] == "close" and not up.lingered


def test_on_close_is_called_once_after_both_sides_are_gone():
    _, _, _, splice, closes = make()
    splice.start()
    splice.downstream.data_received(b"x")
    splice.abort()
    splice.downstream.connection_lost(None)
    assert closes == []
    splice.upstream.connection_lost(None)
    splice.upstream.connection_lost(OSError())
    assert closes == [(1, 0)] and splice.closed


# ------------------------------------------------------------------ idle timeout


def test_idle_splice_closes_both_between_the_timeout_and_a_quarter_more():
    loop, down, up, splice, _ = make(idle_timeout=4.0)
    splice.start()
    loop.advance(3.9)
    assert not down.closing
    loop.advance(1.0)
    assert down.calls[-1] == "close" and up.calls[-1] == "close"
    assert splice.idle_closed


def test_traffic_in_either_direction_postpones_the_idle_close():
    loop, down, up, splice, _ = make(idle_timeout=4.0)
    splice.start()
    for _ in range(5):
        loop.advance(2.0)
        splice.upstream.data_received(b"tick")
    assert not down.closing and not up.closing
    loop.advance(5.1)
    assert down.closing and up.closing


def test_idle_close_resets_a_side_whose_buffer_is_not_draining():
    loop, down, up, splice, _ = make(idle_timeout=1.0)
    splice.start()
    up.buffer = 5000
    loop.advance(1.3)
    assert up.calls[-1] == "abort" and up.lingered
    assert down.calls[-1] == "close"


def test_idle_timer_stops_once_both_sides_are_gone():
    loop, _, _, splice, _ = make(idle_timeout=1.0)
    splice.start()
    assert loop.pending
    lose_both(splice)
    assert loop.pending == []


def test_no_idle_timer_without_an_idle_timeout():
    loop, _, _, splice, _ = make(idle_timeout=None)
    splice.start()
    assert loop.pending == []
