# Augmenting declarations for httptools_backend.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec cimport framing
from libc.stdint cimport int32_t, uint8_t, uint64_t
from cpython.object cimport PyObject

# The start of llhttp's parser struct (llhttp.h of llhttp 8 and 9, up to http_minor) and of the
# httptools HttpParser object that holds a pointer to it (parser.pyx of httptools 0.6.4-0.9.x:
# the object header, the vtable pointer, then `llhttp_t* _cparser`).  Read only once
# _check_llhttp_layout has confirmed both for the installed httptools.
cdef struct _llhttp_start:
    int32_t _index
    void* _span_pos0
    void* _span_cb0
    int32_t error
    const char* reason
    const char* error_pos
    void* data
    void* _current
    uint64_t content_length
    uint8_t type
    uint8_t method
    uint8_t http_major
    uint8_t http_minor

cdef struct _httptools_parser_start:
    Py_ssize_t ob_refcnt
    void* ob_type
    void* vtab
    _llhttp_start* cparser

cdef inline int _llhttp_version(object parser):
    # major * 256 + minor, or -1 when the struct does not point back at this parser
    # (llhttp's `data`, which httptools sets to the parser object)
    if sizeof(PyObject) != sizeof(Py_ssize_t) + sizeof(void*):
        return -1                              # a debug build's object header is longer
    cdef _llhttp_start* c = (<_httptools_parser_start*><PyObject*>parser).cparser
    if c == NULL or c.data != <void*>parser:
        return -1
    return c.http_major << 8 | c.http_minor

cdef bint _llhttp_readable

@cython.locals(v=int)
cdef bytes _version(parser)

@cython.locals(p="const unsigned char*", i=Py_ssize_t, n=Py_ssize_t)
cdef tuple _field(bytes name, bytes value)

cdef class _Base:
    cdef public object _handler, _limits, _parser, on_header, on_body, _handler_body, _handler_complete
    cdef public list _raw
    cdef public int _state, _err_status
    cdef public Py_ssize_t _head_bytes, _line_carry, _ext_cap, _body_bytes, _max_head_bytes, _max_raw, _max_body
    cdef public bint _chunked, _line_pending, _chunk_header_seen, _keep_alive
    cdef public bytes _tunnel

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

    cdef _refuse(self, exc)

cdef class HttptoolsResponseParser(_Base):
    cdef public bytes _reason
    cdef public bint _skip
    cdef public int _head_kind
    cdef public object _py, _handler_head

    cpdef feed(self, data)
