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

@cython.locals(headers=dict, name=bytes, value=bytes, key=str, old=str, target=str, path=str, query=str,
               view=RequestView)
cpdef RequestView view_from_head(RequestHead head, Py_ssize_t port, str scheme, str source_ip)
