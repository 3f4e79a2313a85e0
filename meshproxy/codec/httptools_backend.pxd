# Augmenting declarations for httptools_backend.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec cimport framing
from meshproxy.codec.api cimport MessageHandler
from meshproxy.lists cimport push, with_room
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from cpython.object cimport PyObject
from posix.dlfcn cimport dlopen, dlsym, RTLD_NOW
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy, memcmp

cdef extern from "<dlfcn.h>":
    int RTLD_NOLOAD

# llhttp's parser struct (llhttp.h as bundled in the httptools 0.9.0 sdist, llhttp 9; llhttp 8
# and earlier 9 releases start it the same way up to http_minor, all _llhttp_version reads) and
# the start of the httptools HttpParser object that holds a pointer to it (parser.pyx of httptools
# 0.6.4-0.9.x: the object header, the vtable pointer, then `llhttp_t* _cparser`).  The version
# is read through httptools' pointer only once _check_llhttp_layout has confirmed both for the
# installed httptools; the whole struct is used by the directly driven parsers below.
cdef struct _llhttp_t:
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
    uint8_t header_state
    uint16_t lenient_flags
    uint8_t upgrade
    uint8_t finish
    uint16_t flags
    uint16_t status_code
    uint8_t initial_message_completed
    void* settings

cdef struct _httptools_parser_start:
    Py_ssize_t ob_refcnt
    void* ob_type
    void* vtab
    _llhttp_t* cparser

cdef inline int _llhttp_version(object parser):
    # major * 256 + minor, or -1 when the struct does not point back at this parser
    # (llhttp's `data`, which httptools sets to the parser object)
    if sizeof(PyObject) != sizeof(Py_ssize_t) + sizeof(void*):
        return -1                              # a debug build's object header is longer
    cdef _llhttp_t* c = (<_httptools_parser_start*><PyObject*>parser).cparser
    if c == NULL or c.data != <void*>parser:
        return -1
    return c.http_major << 8 | c.http_minor

cdef bint _llhttp_readable
# module constants read at C level on every read (else: a global lookup and a boxed compare)
cdef int _HEAD, _BODY, _TUNNEL, _CLOSED, _DEAD
cdef int _HPE_INVALID_METHOD, _HPE_INVALID_URL, _HPE_INVALID_STATUS, _HPE_PAUSED_UPGRADE, _HPE_USER
cdef int BODY_CHUNKED, BODY_UNTIL_CLOSE

# Driving llhttp directly: its callback table, and the functions httptools' extension module
# exports.  Used only once _choose_llhttp_driver has found every function and a self-check
# agrees with httptools' parser objects.
ctypedef int (*_ll_data_cb)(_llhttp_t*, const char*, size_t) noexcept
ctypedef int (*_ll_cb)(_llhttp_t*) noexcept

cdef struct _ll_settings:
    _ll_cb on_message_begin
    _ll_data_cb on_protocol
    _ll_data_cb on_url
    _ll_data_cb on_status
    _ll_data_cb on_method
    _ll_data_cb on_version
    _ll_data_cb on_header_field
    _ll_data_cb on_header_value
    _ll_data_cb on_chunk_extension_name
    _ll_data_cb on_chunk_extension_value
    _ll_cb on_headers_complete
    _ll_data_cb on_body
    _ll_cb on_message_complete
    _ll_cb on_protocol_complete
    _ll_cb on_url_complete
    _ll_cb on_status_complete
    _ll_cb on_method_complete
    _ll_cb on_version_complete
    _ll_cb on_header_field_complete
    _ll_cb on_header_value_complete
    _ll_cb on_chunk_extension_name_complete
    _ll_cb on_chunk_extension_value_complete
    _ll_cb on_chunk_header
    _ll_cb on_chunk_complete
    _ll_cb on_reset

ctypedef void (*_ll_init_fn)(_llhttp_t*, int, const _ll_settings*) noexcept
ctypedef int (*_ll_execute_fn)(_llhttp_t*, const char*, size_t) noexcept
ctypedef const char* (*_ll_text_fn)(const _llhttp_t*) noexcept
ctypedef void (*_ll_parser_fn)(_llhttp_t*) noexcept
ctypedef void (*_ll_flag_fn)(_llhttp_t*, int) noexcept
ctypedef const char* (*_ll_name_fn)(int) noexcept

cdef _ll_init_fn _ll_init
cdef _ll_execute_fn _ll_execute
cdef _ll_text_fn _ll_error_pos, _ll_error_reason
cdef _ll_parser_fn _ll_resume_after_upgrade
cdef _ll_flag_fn _ll_lenient_version
cdef _ll_settings _LL_SETTINGS
cdef tuple _LL_METHODS
cdef bint _ll_driven

@cython.locals(handle="void*", fn="void*", i=int)
cdef bint _resolve_llhttp(bytes path) except -1
@cython.locals(out=bytes, w="char*", i=size_t, c="unsigned char")
cdef bytes _lowered(const char* at, size_t n)
cdef uint32_t _SLOT_MULT
cdef tuple _NAME_SLOTS
cdef uint64_t _WORD_20, _WORD_80
@cython.locals(key=uint32_t)
cdef inline uint32_t _slot(uint32_t n, unsigned char first, unsigned char last, unsigned char middle, uint32_t mult)
@cython.locals(known=bytes, p="const char*", i=size_t, j=size_t, w=uint64_t, k=uint64_t, c="unsigned char", s=int)
cdef int _name_slot(const char* at, size_t n)
cdef Py_ssize_t _CACHED_VALUE_MAX, _FIELDS_ROOM
cdef list _FIELD_CACHE
cdef bytes _CACHEABLE_SLOTS
cdef int _ll_on_url(_llhttp_t* p, const char* at, size_t n) noexcept
cdef int _ll_on_status(_llhttp_t* p, const char* at, size_t n) noexcept
@cython.locals(s=int)
cdef int _ll_on_header_field(_llhttp_t* p, const char* at, size_t n) noexcept
@cython.locals(s=int, value=bytes)
cdef int _ll_on_header_value(_llhttp_t* p, const char* at, size_t n) noexcept
cdef int _ll_on_headers_complete(_llhttp_t* p) noexcept
cdef int _ll_on_body(_llhttp_t* p, const char* at, size_t n) noexcept
cdef int _ll_on_message_complete(_llhttp_t* p) noexcept
cdef int _ll_on_chunk_header(_llhttp_t* p) noexcept
cdef int _ll_on_chunk_complete(_llhttp_t* p) noexcept

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
    cdef _llhttp_t _ll
    cdef char _ll_slack[64]                     # room should a later llhttp 9 grow its struct
    cdef public bint _driven
    cdef bytes _hname, _hvalue
    cdef object _hfield                         # the kept field the value matched, or None
    cdef int _hslot                             # the name's cacheable _NAME_SLOTS index, or -1
    cdef object _cb_error
    cdef public MessageHandler _sink

    cdef _drive(self, int kind)
    @cython.locals(buf=bytes, err=int)
    cdef _execute(self, data)
    @cython.locals(ll="_llhttp_t*", reason="const char*")
    cdef _llhttp_failed(self, int err, const char* base)
    @cython.locals(value=bytes, n=Py_ssize_t, p="const unsigned char*", field=tuple)
    cdef _flush_field(self)
    cdef list _take_fields(self)
    cdef bytes _message_version(self)
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
    cpdef on_status(self, bytes reason)
    cpdef on_headers_complete(self)
    cpdef on_message_complete(self)
