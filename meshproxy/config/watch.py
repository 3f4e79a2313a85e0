"""Polls config files and reports a change after a bounded debounce.

:class:`ConfigWatcher` has no task of its own: the caller runs :meth:`run` in a task it
owns and cancels.  Every ``interval`` it takes a signature of every config file under the
paths (path, mtime, size, content hash).  When the signature differs from the last one it
reported, it polls every ``quiet`` seconds and calls ``on_change()`` once the files have
stayed the same for ``quiet`` seconds (an editor writing a file in several steps,
``kubectl``-style directory swaps), or once ``max_wait`` seconds have passed since the first
change it has not reported, whatever is still changing: a file rewritten many times a second
is applied at its latest content every ``max_wait``, never held back until the writes stop.
The same debounce as the control plane's push (Istio's PILOT_DEBOUNCE_AFTER 100 ms /
PILOT_DEBOUNCE_MAX 10 s).  The decision is :class:`Debounce`, a pure state machine fed with
signatures and times.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Callable, Hashable, Iterable

from .load import config_files

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int, str], ...]


def signature(paths: Iterable[str]) -> Signature:
    files, _ = config_files(paths)
    out = []
    for path in files:
        try:
            st = os.stat(path)
            with open(path, "rb") as fh:
                digest = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
        except OSError:
            continue                      # vanished between listing and reading: next poll sees it
        out.append((path, st.st_mtime_ns, st.st_size, digest))
    return tuple(out)


class Debounce:
    """When to report a changed state: after ``quiet`` seconds without a further change, or
    ``max_wait`` seconds after the first change not yet reported.

    :meth:`observe` takes the state seen at time ``now`` and returns (report, next poll in
    seconds); after a report the reported state is the new baseline."""

    __slots__ = ("reported", "interval", "quiet", "max_wait", "_pending", "_first", "_changed")

    def __init__(self, reported: Hashable, interval: float, quiet: float, max_wait: float):
        self.reported = reported
        self.interval, self.quiet, self.max_wait = interval, quiet, max_wait
        self._pending: Hashable | None = None   # the latest unreported state seen
        self._first = 0.0                        # when the first unreported change was seen
        self._changed = 0.0                      # when _pending was last different

    def observe(self, state: Hashable, now: float) -> tuple[bool, float]:
        if state == self.reported:
            self._pending = None                 # changed back: nothing to report
            return False, self.interval
        if self._pending is None:
            self._pending, self._first, self._changed = state, now, now
        elif state != self._pending:
            self._pending, self._changed = state, now
        if now - self._changed >= self.quiet or now - self._first >= self.max_wait:
            self.reported, self._pending = state, None
            return True, self.interval
        return False, max(0.0, min(self.quiet - (now - self._changed), self._first + self.max_wait - now))


class ConfigWatcher:
    def __init__(self, paths: list[str], on_change: Callable[[], None], interval: float = 1.0,
                 quiet: float = 0.1, max_wait: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.paths = list(paths)
        self.on_change = on_change
        self.clock = clock
        self.debounce = Debounce(signature(self.paths), interval, quiet, max_wait)

    async def run(self) -> None:
        delay = self.debounce.interval
        while True:
            await asyncio.sleep(delay)
            current = await asyncio.to_thread(signature, self.paths)
            report, delay = self.debounce.observe(current, self.clock())
            if not report:
                continue
            try:
                self.on_change()
            except Exception:              # the watcher must outlive a failing callback
                log.exception("config on_change callback failed")
