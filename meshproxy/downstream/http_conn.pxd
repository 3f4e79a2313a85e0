# Augmenting declarations for http_conn.py (Cython experiment, branch cython-exp).
from meshproxy.proxy.pipeline cimport Exchange

cdef class DownstreamConnection:
    cdef public object worker, listener, transport, parser
    cdef public str client_ip
    cdef public int state, read_paused_by
    cdef public Exchange exchange
    cdef public object queue, tunnel, write
    cdef public double since
    cdef public list out, upgrade_buffer
    cdef public bint keep_alive, closed, replaying, feeding
    cdef public Py_ssize_t requests, out_start
