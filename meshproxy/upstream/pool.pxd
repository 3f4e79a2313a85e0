# Augmenting declarations for pool.py (Cython experiment, branch cython-exp).
cimport cython
from meshproxy.upstream.connection cimport UpstreamConnection

cdef class EndpointPool:
    cdef public object key, _pools
    cdef public list idle
    cdef public Py_ssize_t active, created

cdef class UpstreamPools:
    cdef public object _loop, dns, _make_parser, _clock, _opened_cb, _closed_cb
    cdef public dict _pools
    cdef public set _tasks

    @cython.locals(pool=EndpointPool, idle=list, conn=UpstreamConnection)
    cpdef acquire_idle(self, key, idle_timeout)
    @cython.locals(pool=EndpointPool)
    cpdef release(self, UpstreamConnection conn, bint reusable, Py_ssize_t max_idle, Py_ssize_t max_requests=*)
