# Augmenting declarations for http_conn.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.proxy.pipeline cimport Exchange
from meshproxy.codec.api cimport RequestHead, MessageHandler
from meshproxy.codec.httptools_backend cimport _Base as LlhttpParser
from meshproxy.bootstrap cimport Worker
from meshproxy.lists cimport clear, push, with_room

cdef class DownstreamConnection(MessageHandler):
    cdef public Worker worker
    cdef public object listener, transport, parser
    cdef public str client_ip
    cdef public int state, read_paused_by
    cdef public Exchange exchange
    cdef public object queue, tunnel, send
    cdef public double since
    cdef public list out, upgrade_buffer
    cdef public bint keep_alive, closed, replaying, feeding
    cdef public Py_ssize_t requests, out_start
    cdef public object vhost_snapshot, vhost
    cdef public bytes vhost_authority
    cdef public str scheme
    cdef public tuple client_fields
    cdef public bint inbound
    cdef public bint queued
    cdef public object sender

    cpdef on_request_head(self, RequestHead head)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)
    @cython.locals(exchange=Exchange)
    cdef _start(self, RequestHead head)
    cdef _enqueue(self, event)
    @cython.locals(exchange=Exchange)
    cpdef exchange_finished(self, exchange, bint keep_alive)
    cdef _replay(self)
    cpdef write(self, data)
    cpdef flush(self)
    @cython.locals(out=list, exchange=Exchange)
    cpdef send_now(self)
    cpdef reject(self, status, reason)
    cpdef close_after_flush(self)
    cpdef close(self)
    cpdef abort(self)
    cpdef pause_reading(self, int reason)
    @cython.locals(was=int)
    cpdef resume_reading(self, int reason)
