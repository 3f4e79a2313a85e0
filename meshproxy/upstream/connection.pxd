# Augmenting declarations for connection.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec.api cimport ResponseHead
from meshproxy.driver cimport ConnectionDriver
from meshproxy.batch cimport SendBatch
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING

cdef Py_ssize_t _READ_SIZE, _MIN_READ
cdef object _READ_VIEW
cdef char* _read_start

cdef class UpstreamHandler:
    cpdef upstream_response_head(self, ResponseHead head)
    cpdef upstream_body(self, data)
    cpdef upstream_complete(self)
    cpdef upstream_read_done(self)
    cpdef upstream_reset(self, exc)
    cpdef upstream_protocol_error(self, err)
    cpdef upstream_write_paused(self)
    cpdef upstream_write_resumed(self)

cdef class UpstreamConnection(ConnectionDriver):
    cdef public object pool, on_close
    cdef public UpstreamHandler handler
    cdef public double idle_since, expires_at
    cdef public Py_ssize_t requests, read_size
    cdef public bint _counted
    cdef public str peer_identity

    @cython.locals(size=Py_ssize_t)
    cpdef get_buffer(self, Py_ssize_t sizehint)
    cpdef buffer_updated(self, Py_ssize_t nbytes)
    cpdef data_received(self, data)
    cpdef on_response_head(self, ResponseHead head)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)
    cpdef close(self)
    cdef _run_on_close(self)
