# Augmenting declarations for llhttp_driver.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference; this module does its work only compiled (see its docstring).
cimport cython
from meshproxy.codec.api cimport MessageHandler
from meshproxy.codec.httptools_backend cimport _Base, HttptoolsRequestParser, HttptoolsResponseParser
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.dlfcn cimport dlopen, dlsym, RTLD_NOW
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcmp

cdef extern from "<strings.h>":
    int strncasecmp(const char* a, const char* b, size_t n)

cdef extern from "<dlfcn.h>":
    int RTLD_NOLOAD

# llhttp's parser struct, as declared by llhttp.h as bundled in the httptools 0.9.0 sdist
# (llhttp 9).  Used only for httptools 0.9.x, after the self-check (_driver_agrees).
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

# llhttp's callback table and the functions httptools' extension module exports
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
cdef int _HPE_INVALID_METHOD, _HPE_INVALID_URL, _HPE_INVALID_STATUS, _HPE_PAUSED_UPGRADE, _HPE_USER

@cython.locals(handle="void*", fn="void*", i=int)
cdef bint _resolve_llhttp(bytes path) except -1
@cython.locals(out=bytes, w="char*", i=size_t, c="unsigned char")
cdef bytes _lowered(const char* at, size_t n)
cdef uint32_t _SLOT_MULT
cdef tuple _NAME_SLOTS
@cython.locals(key=uint32_t)
cdef inline uint32_t _slot(uint32_t n, unsigned char first, unsigned char last, unsigned char middle, uint32_t mult)
@cython.locals(known=bytes, s=int)
cdef int _name_slot(const char* at, size_t n)
cdef Py_ssize_t _CACHED_VALUE_MAX, _VIEW_MIN
cdef list _FIELD_CACHE
cdef bytes _CACHEABLE_SLOTS

ctypedef void* _borrowed                       # an object reference not counted

cdef class _Llhttp:
    cdef _llhttp_t c
    cdef char slack[64]                         # room should a later llhttp 9 grow its struct
    cdef _borrowed owner                        # the parser that holds this object
    cdef bytes hname, hvalue
    cdef object hfield                          # the kept field the value matched, or None
    cdef int hslot                              # the name's cacheable _NAME_SLOTS index, or -1
    cdef object cb_error
    cdef bytes buf                              # the read being parsed, during execute
    cdef bint views                             # large response bodies as views of buf

    @cython.locals(buf=bytes, err=int)
    cdef execute(self, data)
    @cython.locals(c="_llhttp_t*", reason="const char*")
    cdef failed(self, int err, const char* base)
    @cython.locals(v=int)
    cdef bytes version(self)
    @cython.locals(buf=bytes, start=Py_ssize_t)
    cdef body(self, const char* at, Py_ssize_t n)
    @cython.locals(value=bytes, n=Py_ssize_t, p="const unsigned char*", field=tuple)
    cdef flush_field(self)

cdef int _ll_on_url(_llhttp_t* p, const char* at, size_t n) noexcept
cdef int _ll_on_status(_llhttp_t* p, const char* at, size_t n) noexcept
@cython.locals(s=int)
cdef int _ll_on_header_field(_llhttp_t* p, const char* at, size_t n) noexcept
@cython.locals(s=int, value=bytes)
cdef int _ll_on_header_value(_llhttp_t* p, const char* at, size_t n) noexcept
cdef int _ll_on_headers_complete(_llhttp_t* p) noexcept
@cython.locals(parser=_Base)
cdef int _ll_on_body(_llhttp_t* p, const char* at, size_t n) noexcept
cdef int _ll_on_message_complete(_llhttp_t* p) noexcept
@cython.locals(parser=_Base)
cdef int _ll_on_chunk_header(_llhttp_t* p) noexcept
cdef int _ll_on_chunk_complete(_llhttp_t* p) noexcept

cdef class LlhttpRequestParser(HttptoolsRequestParser):
    @cython.locals(ll=_Llhttp)
    cdef _new_parser(self)
    cdef _execute(self, data)
    cdef bytes _message_version(self)
    cdef bytes _method(self)

cdef class LlhttpResponseParser(HttptoolsResponseParser):
    cdef _new_parser(self)
    cdef _execute(self, data)
    cdef bytes _message_version(self)
    cdef int _status(self) except -1
