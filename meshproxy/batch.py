"""The worker's writes of one busy event-loop pass, sent together at its end.

A connection with bytes for its socket adds its ``send`` to the worker's :class:`SendBatch`
once per pass and keeps adding bytes to its own output.  When the last pass sent for more
than ``BUSY_PASS`` connections (the worker is busy), the batch holds the sends and calls
them after the pass's other callbacks have run (``loop.call_soon``: the next turn runs ready callbacks
before it polls again); Envoy defers the same way (a connection's ``write`` buffers and
activates the socket's write event).  When the last pass was light, ``send`` runs at once:
holding it would only delay the answer by the rest of the pass.

Why hold them: the peers (client, upstream) sleep in ``epoll_wait`` on another core.  Every
write that finds its reader asleep wakes it, and on a VM that wake-up (an inter-processor
interrupt) costs more than the write itself.  Writes made in one burst at the end of a busy
pass find the reader woken by the first still running; writes spread over the pass wake it
again each time.  Why not always: at a light load a pass serves one event, there is no burst
to make, and holding the write costs latency.  Numbers: `benchmarks/RESULTS.md`, "write
batching".

A connection that must write in order with something else that goes straight to its
transport (``write_eof``, ``close``, a tunnel taking over the socket) calls its ``send``
itself first; an aborted connection drops what it had queued.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("meshproxy")

# A pass that sent for more connections than this makes the next pass hold its sends (the
# thresholds tried under benchmarks/run.py's latency load: RESULTS.md, "write batching").
BUSY_PASS = 4


class SendBatch:
    __slots__ = ("call_soon", "end", "sends", "scheduled", "adds", "deferring")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.call_soon = loop.call_soon      # bound once: one call per pass
        self.end = self.run
        self.sends: list[Callable[[], None]] = []
        self.scheduled = False
        self.adds = 0              # sends added in this pass
        self.deferring = False     # the last pass was busy (> BUSY_PASS sends): hold this pass's sends

    def add(self, send: Callable[[], None]) -> None:
        """``send()`` runs now when the last pass was light, else at the end of this pass
        (the caller adds it once per pass)."""
        self.adds += 1
        if not self.scheduled:
            self.scheduled = True
            self.call_soon(self.end)
        if self.deferring:
            self.sends.append(send)
        else:
            send()

    def run(self) -> None:
        """The end of a pass: send what it held (also called directly by tests and
        benchmarks) and decide whether the next pass holds its sends."""
        self.scheduled = False
        self.deferring = self.adds > BUSY_PASS
        self.adds = 0
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
