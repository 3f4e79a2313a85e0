# Augmenting declarations for httptools_backend.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
# meshproxy/codec/llhttp_driver.pxd subclasses the two parsers (the llhttp backend).
cimport cython
from meshproxy.codec cimport framing
from meshproxy.codec.api cimport MessageHandler

# module constants read at C level on every read (else: a global lookup and a boxed compare)
cdef int _HEAD, _BODY, _TUNNEL, _CLOSED, _DEAD
cdef int BODY_CHUNKED, BODY_UNTIL_CLOSE

cdef class _Base:
    cdef public object _handler, _limits, _parser, on_body, _handler_body, _handler_complete
    cdef public list _raw
    cdef public int _state, _err_status
    cdef public Py_ssize_t _head_bytes, _line_carry, _ext_cap, _body_bytes, _max_head_bytes, _max_raw, _max_body
    cdef public bint _chunked, _line_pending, _chunk_header_seen, _keep_alive
    cdef public bytes _tunnel
    cdef public MessageHandler _sink

    cdef _new_parser(self)
    cdef _execute(self, data)
    cdef bytes _message_version(self)
    cdef list _take_fields(self)
    cpdef on_headers_complete(self)
    cpdef on_message_complete(self)
    cpdef on_chunk_header(self)
    cpdef on_chunk_complete(self)
    @cython.locals(state=int)
    cpdef feed(self, data)
    cdef _feed(self, data)
    cdef _parser_error(self, exc, data)
    cdef _refuse(self, exc)
    cdef _too_many_fields(self)
    @cython.locals(state=int)
    cdef _after_feed(self, data)
    cdef _after_feed_line(self, data)
    cdef bint _long_ext_line_possible(self, data) except -1
    cdef _feed_by_line(self, data)
    cdef _check_trailers(self, bint complete=*)
    cdef bint _head_too_big(self, Py_ssize_t first_line) except -1

cdef class HttptoolsRequestParser(_Base):
    cdef public bytes _url
    cdef public Py_ssize_t _max_target
    cdef public object _handler_head

    cdef _new_parser(self)
    cdef bytes _method(self)
    cdef _refuse(self, exc)
    cpdef on_url(self, bytes url)
    cpdef on_headers_complete(self)
    cpdef on_message_complete(self)

cdef class HttptoolsResponseParser(_Base):
    cdef public bytes _reason
    cdef public bint _skip
    cdef public int _head_kind
    cdef public object _py, _handler_head

    cpdef feed(self, data)
    cdef _new_parser(self)
    cdef int _status(self) except -1
    cpdef on_status(self, bytes reason)
    cpdef on_headers_complete(self)
    cpdef on_message_complete(self)
