# Augmenting declarations for connection.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.proxy.pipeline cimport Exchange
from meshproxy.codec.api cimport ResponseHead, MessageHandler
from meshproxy.codec.httptools_backend cimport _Base as LlhttpParser
from meshproxy.batch cimport SendBatch
from meshproxy.lists cimport clear, push

cdef class UpstreamConnection(MessageHandler):
    cdef public object transport, parser, pool, on_close, sender
    cdef public list out
    cdef public bint queued
    cdef public SendBatch batch
    cdef public Exchange exchange
    cdef public double idle_since
    cdef public Py_ssize_t requests
    cdef public bint closed, _counted

    cpdef on_response_head(self, ResponseHead head)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)
    cpdef write(self, data)
    @cython.locals(out=list)
    cpdef send(self)
    cpdef close(self)
    cdef _run_on_close(self)
