# Augmenting declarations for connection.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.proxy.pipeline cimport Exchange

cdef class UpstreamConnection:
    cdef public object transport, parser, pool, on_close, write
    cdef public Exchange exchange
    cdef public double idle_since
    cdef public Py_ssize_t requests
    cdef public bint closed, _counted

    cpdef close(self)
    cdef _run_on_close(self)
