# Augmenting declarations for clock.py (scripts/build_ext.py).
cimport cython
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC

@cython.locals(ts=timespec)
cpdef double monotonic()
