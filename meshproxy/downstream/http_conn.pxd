# Augmenting declarations for http_conn.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.proxy.pipeline cimport Downstream, Exchange
from meshproxy.driver cimport ConnectionDriver
from meshproxy.codec.api cimport RequestHead

cdef class DownstreamConnection(Downstream):
    cdef public int state
    cdef public Exchange exchange
    cdef public object queue
    cdef public list upgrade_buffer
    cdef public bint replaying, answer_sent
    cdef public Py_ssize_t requests, out_start, body_seen
    cdef public object refusal, body_exchange
    cdef public double body_since

    cpdef on_request_head(self, RequestHead head)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)
    @cython.locals(exchange=Exchange)
    cdef _start(self, RequestHead head)
    cdef _enqueue(self, event)
    cpdef exchange_finished(self, exchange, bint keep_alive)
    cdef _replay(self)
    cpdef send_now(self)
    cpdef refuse(self, status, reason)
    cpdef reject(self, status, reason)
    cdef _answer_and_close(self, int status)
    cpdef close_after_flush(self)
    cpdef close(self)
    cpdef bytes take_tunnel_bytes(self)
