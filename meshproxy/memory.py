"""Giving freed heap memory back to the system after a burst of connections.

A worker that buffered a burst (thousands of slow readers, each holding its share of a
response) frees those buffers when the connections go, but the C allocator keeps the pages
on its heap: RSS stays at the peak.  glibc's ``malloc_trim`` returns free pages to the
system; :class:`Trimmer` calls it once a burst is over, judged by the number of open
downstream connections (no call on other C libraries, where it does not exist).

:func:`usage` is what the admin's ``/memory`` shows of a process: its resident set and the
modules it has imported."""
from __future__ import annotations

import os
import sys


def _malloc_trim():
    """glibc's malloc_trim from the symbols the process already has (no ``ldconfig`` run);
    ``ctypes`` is imported only here, when a burst is first over."""
    import ctypes
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class Trimmer:
    """``observe(open_connections, most)`` once a second (``most``: the most that were open at
    once since the last call, so that a burst that came and went between two calls counts):
    trims when the count has fallen to half the peak seen since the last trim, if that peak
    was at least ``min_peak``."""

    __slots__ = ("peak", "min_peak", "_trim", "trims")

    def __init__(self, min_peak: int = 32, trim=None):
        self.peak = 0
        self.min_peak = min_peak
        self._trim = trim           # None: glibc's, looked up at the first trim
        self.trims = 0

    def observe(self, open_connections: int, most: int = 0) -> bool:
        if most > self.peak:
            self.peak = most
        if open_connections > self.peak:
            self.peak = open_connections
            return False
        if self.peak < self.min_peak or open_connections > self.peak // 2:
            return False
        self.peak = open_connections
        if self._trim is None:
            self._trim = _malloc_trim() or (lambda pad: 0)
        self._trim(0)
        self.trims += 1
        return True


def usage(role: str, **extra) -> dict:
    """What this process holds, for the admin's ``/memory``: its resident set (from
    ``/proc/self/statm``) and the modules it has imported (what a proxy loads only for
    the features its config and flags use: certificates, tracing export, DNS capture,
    the control-plane client, the h11 codec)."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None
    return {"role": role, "pid": os.getpid(), "rss_bytes": rss, "modules": sorted(sys.modules), **extra}
