# Augmenting declarations for api.py: the two heads
# become extension-type dataclasses (@cython.dataclasses.dataclass in api.py).
# The field order here IS the __init__ argument order: keep it identical to api.py.
cdef class RequestHead:
    cdef public bytes method
    cdef public bytes target
    cdef public bytes version
    cdef public object headers
    cdef public bytes host
    cdef public bytes path
    cdef public int body_kind
    cdef public Py_ssize_t content_length
    cdef public bint keep_alive
    cdef public bytes upgrade
    cdef public bint expect_continue
    cdef public tuple names

cdef class ResponseHead:
    cdef public int status
    cdef public bytes reason
    cdef public bytes version
    cdef public object headers
    cdef public int body_kind
    cdef public Py_ssize_t content_length
    cdef public bint keep_alive
    cdef public tuple names

cdef class CodecLimits:
    cdef readonly Py_ssize_t max_header_bytes
    cdef readonly Py_ssize_t max_header_count
    cdef readonly Py_ssize_t max_target_bytes
    cdef readonly Py_ssize_t max_body_bytes
    cdef readonly Py_ssize_t max_chunk_ext_bytes

cdef class MessageHandler:
    cpdef on_request_head(self, RequestHead head)
    cpdef on_response_head(self, ResponseHead head)
    cpdef on_body(self, data)
    cpdef on_message_complete(self)

ctypedef fused _Head:
    RequestHead
    ResponseHead

# typed for either head: the callers' C-level read of head.names
cpdef tuple field_names(_Head head)
