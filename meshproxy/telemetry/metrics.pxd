# Augmenting declarations for metrics.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython

cdef tuple _BOUNDS

@cython.locals(buckets=list)
cdef _add_request(list s, double duration_ms, Py_ssize_t request_bytes, Py_ssize_t response_bytes)
@cython.locals(i=Py_ssize_t, bound=double)
cdef Py_ssize_t _bucket(double value) except -1
