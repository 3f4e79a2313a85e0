# Augmenting declarations for driver.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec.api cimport MessageHandler
from meshproxy.codec.httptools_backend cimport _Base as LlhttpParser
from meshproxy.batch cimport SendBatch

cdef class ConnectionDriver(MessageHandler):
    cdef public object transport, parser, sender, send, send_many
    cdef public list out
    cdef public bint queued, closed
    cdef public SendBatch batch
    cdef public int read_paused_by

    cpdef feed(self, data)
    cpdef write(self, data)
    cpdef flush(self)
    @cython.locals(out=list)
    cpdef send_now(self)
    cpdef pause_reading(self, int reason)
    @cython.locals(was=int)
    cpdef resume_reading(self, int reason)
    cpdef abort(self)
    cpdef lost(self)
