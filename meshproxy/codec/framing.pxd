# Augmenting declarations for framing.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from libc.string cimport memcmp, memcpy
from libc.stdint cimport uint64_t
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from meshproxy.codec.api cimport RequestHead, ResponseHead, CodecLimits

cdef int BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE

cdef bytes _TCHAR_OK, _VALUE_OK, _TARGET_OK
cdef frozenset _REQUEST_RARE_FIELDS, _REQUEST_FRAMING_FIELDS
cdef dict _LENGTHS, _PERSISTENT_1_1
@cython.locals(name=bytes)
cdef bint _none_of(frozenset fields, tuple names) except -1
@cython.locals(n=Py_ssize_t, i=Py_ssize_t, p="const unsigned char*", total="long long")
cdef long long _short_digits(bytes value) except? -2
cdef uint64_t _WORD_01, _WORD_20, _WORD_7F, _WORD_80
@cython.locals(bad=bint, empty=bint, n=Py_ssize_t, i=Py_ssize_t, p="const unsigned char*",
               tchar="const unsigned char*", vchar="const unsigned char*", name=bytes, value=bytes,
               fields=list, count=Py_ssize_t, k=Py_ssize_t, names_out=tuple, w=uint64_t, d=uint64_t)
cdef tuple _checked_fields(headers, CodecLimits limits, int status)
@cython.locals(ok="const unsigned char*", p="const unsigned char*", bad=bint, i=Py_ssize_t)
cdef bint _target_ok(bytes target) except -1
@cython.locals(found=Py_ssize_t, n=Py_ssize_t, i=Py_ssize_t, item=bytes, a="const char*", b="const char*")
cpdef Py_ssize_t field_index(tuple names, bytes name) except -3
@cython.locals(i=Py_ssize_t)
cdef list _values_of(bytes name, tuple names, headers)
@cython.locals(head=RequestHead)
cdef RequestHead _new_request_head(bytes method, bytes target, bytes version, headers, bytes host, bytes path,
                                   int body_kind, Py_ssize_t content_length, bint keep_alive, bytes upgrade,
                                   bint expect_continue, tuple names)
@cython.locals(head=ResponseHead)
cdef ResponseHead _new_response_head(int status, bytes reason, bytes version, headers, int body_kind,
                                     Py_ssize_t content_length, bint keep_alive, tuple names)
@cython.locals(names=tuple, host_index=Py_ssize_t)
cpdef RequestHead request_head(method, target, version, headers, CodecLimits limits)
@cython.locals(cl=Py_ssize_t, te=Py_ssize_t, conn=Py_ssize_t, i=Py_ssize_t, n=Py_ssize_t, item=bytes, p="const char*")
cdef (Py_ssize_t, Py_ssize_t, Py_ssize_t) _framing_indices(tuple names) except *
@cython.locals(names=tuple, cl=Py_ssize_t, te=Py_ssize_t, conn=Py_ssize_t, conn_value=bytes)
cpdef ResponseHead response_head(int status, reason, version, headers, CodecLimits limits, bint no_body)
