"""The proxy's clock: seconds on CLOCK_MONOTONIC, the clock ``time.monotonic`` reads and the
event loop's timers count on.  Compiled, :func:`monotonic` is a C function the request path
calls without a Python call (a vDSO read), with the full resolution of the clock (the loop's
``time()`` is libuv's cached millisecond tick)."""
from __future__ import annotations

import time

import cython


def monotonic() -> float:
    """Seconds since an arbitrary point, never going back."""
    if cython.compiled:
        clock_gettime(CLOCK_MONOTONIC, cython.address(ts))   # noqa: F821 (clock.pxd cimports them)
        return ts.tv_sec + ts.tv_nsec * 1e-9                  # noqa: F821
    return time.monotonic()
