# Augmenting declarations for pool.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.upstream.connection cimport UpstreamConnection
from meshproxy.clock cimport monotonic
from meshproxy.lists cimport pop_last, push
from meshproxy.batch cimport SendBatch

cdef class EndpointPool:
    cdef public object key, _pools
    cdef public list idle
    cdef public Py_ssize_t active, created, connecting
    cdef public object waiters
    cdef public bint _offer_scheduled

cdef class UpstreamPools:
    cdef public object _loop, dns, _make_parser, _clock, _opened_cb, _closed_cb, tls
    cdef public dict _pools
    cdef public set _tasks
    cdef public bint _system_clock
    cdef public SendBatch batch

    cdef double _now(self) except? -1.0

    @cython.locals(pool=EndpointPool)
    cpdef acquire_idle(self, key, idle_timeout)
    cpdef acquire_idle_in(self, EndpointPool pool, idle_timeout)
    @cython.locals(idle=list, conn=UpstreamConnection)
    cpdef _pop_idle(self, EndpointPool pool, idle_timeout)
    @cython.locals(pool=EndpointPool, now=double)
    cpdef release(self, UpstreamConnection conn, bint reusable, Py_ssize_t max_idle, Py_ssize_t max_requests=*)
