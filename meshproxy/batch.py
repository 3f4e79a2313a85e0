"""The worker's writes of one event-loop pass, sent together at its end.

A connection with bytes for its socket does not write them in the middle of the pass that
produced them: it adds its ``send`` to the worker's :class:`SendBatch` once, keeps adding
bytes to its own output, and the batch calls every queued ``send`` after the pass's other
callbacks have run (``loop.call_soon``: the next turn runs ready callbacks before it polls
again).  Envoy does the same: a connection's ``write`` buffers and activates the socket's
write event instead of writing in place.

Why: the peers (client, upstream) are asleep in ``epoll_wait`` on another core most of the
time.  Every write that finds its reader asleep wakes it, and on a VM that wake-up (an
inter-processor interrupt) costs more than the write itself.  Writes made in one burst at
the end of the pass find the reader woken by the first one still running; writes spread
over the pass wake it again each time.  Measured: `benchmarks/RESULTS.md`, "write batching".

A connection that must write in order with something else that goes straight to its
transport (``write_eof``, ``close``, a tunnel taking over the socket) calls its ``send``
itself first; an aborted connection drops what it had queued.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("meshproxy")


class SendBatch:
    __slots__ = ("loop", "sends", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.sends: list[Callable[[], None]] = []
        self.scheduled = False

    def add(self, send: Callable[[], None]) -> None:
        """``send()`` runs once at the end of this pass (the caller adds it once per pass)."""
        self.sends.append(send)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        """Send what this pass queued (also called directly by tests and benchmarks)."""
        self.scheduled = False
        sends = self.sends
        i = 0
        while i < len(sends):      # a send that queues another one (none does today) is served too
            send = sends[i]
            i += 1
            try:
                send()
            except Exception:      # one connection's failure must not hold back the others'
                log.exception("sending queued bytes failed")
        sends.clear()
