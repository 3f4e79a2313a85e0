# Augmenting declarations for writer.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython

cdef dict _STATUS_LINES, LENGTH_FIELDS
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

@cython.locals(n=Py_ssize_t, src="const char*")
cdef inline char* _put(char* w, bytes data)
@cython.locals(size=Py_ssize_t, w="char*", name=bytes, value=bytes)
cdef bytes _head(bytes start, bytes middle, bytes end, list headers, bytes tail=*, bytes line_end=*)
# cpdef module functions: other compiled modules cimport them and call them in C.
cpdef bytes encode_request_head(method, target, headers, bytes tail=*)
cpdef bytes encode_response_head(int status, reason, headers, version=*)
cpdef bytes encode_chunk(data)
cpdef bytes chunk_head(Py_ssize_t n)
cpdef tuple content_length_field(n)
