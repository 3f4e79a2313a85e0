# Augmenting declarations for request.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec.api cimport RequestHead

cdef class RequestView:
    cdef public str method, authority, path, query
    cdef public dict headers
    cdef public Py_ssize_t port
    cdef public str scheme, source_ip
    cdef public dict _query_params

from libc.string cimport memchr
from cpython.bytes cimport PyBytes_AS_STRING

@cython.locals(p="const char*", found="const void*")
cdef Py_ssize_t _query_start(bytes target) except -2
@cython.locals(p="const unsigned char*", i=Py_ssize_t)
cdef str _lower_text(bytes raw)
cdef dict _METHOD_TEXT
@cython.locals(headers=dict, name=bytes, value=bytes, key=str, old=str, target=bytes, path=str, query=str,
               view=RequestView, q=Py_ssize_t, method=str)
cpdef RequestView view_from_head(RequestHead head, Py_ssize_t port, str scheme, str source_ip)
