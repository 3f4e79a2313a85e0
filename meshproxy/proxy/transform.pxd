# Augmenting declarations for transform.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec.api cimport RequestHead, ResponseHead, field_names
from meshproxy.codec.framing cimport field_index

from libc.stdint cimport uint64_t

cdef uint64_t _REQUEST_DROP_LENGTHS, _RESPONSE_DROP_LENGTHS

@cython.locals(out=list, field=tuple, name=bytes, n=Py_ssize_t)
cdef list _kept(first, fields, frozenset drop, uint64_t lengths)
@cython.locals(i=Py_ssize_t)
cpdef _named_fields(headers, tuple names)
cpdef tuple client_fields(str client_ip, str scheme)
@cython.locals(names=tuple, out=list)
cpdef list forwarded_request_headers(RequestHead head, authority, tuple client, new_request_id, trace_fields=*)
@cython.locals(out=list)
cpdef list forwarded_response_headers(ResponseHead head, framing, bint keep_alive, bint upgrade=*)
