# Augmenting declarations for connection.py (Cython experiment, branch cython-exp).
cdef class UpstreamConnection:
    cdef public object transport, parser, pool, on_close, write
    cdef public object exchange          # an Exchange (typed access would need a circular cimport)
    cdef public double idle_since
    cdef public Py_ssize_t requests
    cdef public bint closed, _counted
