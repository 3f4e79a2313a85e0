"""Giving freed heap memory back to the system after a burst of connections.

A worker that buffered a burst (thousands of slow readers, each holding its share of a
response) frees those buffers when the connections go, but the C allocator keeps the pages
on its heap: RSS stays at the peak.  glibc's ``malloc_trim`` returns free pages to the
system; :class:`Trimmer` calls it once a burst is over, judged by the number of open
downstream connections (no call on other C libraries, where it does not exist)."""
from __future__ import annotations

import ctypes
import ctypes.util


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Trimmer:
    """``observe(open_connections)`` once a second: trims when the count has fallen to half
    the peak seen since the last trim, if that peak was at least ``min_peak``."""

    __slots__ = ("peak", "min_peak", "_trim", "trims")

    def __init__(self, min_peak: int = 32, trim=None):
        self.peak = 0
        self.min_peak = min_peak
        self._trim = trim if trim is not None else _malloc_trim()
        self.trims = 0

    def observe(self, open_connections: int) -> bool:
        if open_connections > self.peak:
            self.peak = open_connections
            return False
        if self.peak < self.min_peak or open_connections > self.peak // 2:
            return False
        self.peak = open_connections
        if self._trim is not None:
            self._trim(0)
        self.trims += 1
        return True
