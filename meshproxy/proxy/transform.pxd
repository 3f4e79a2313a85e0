# Augmenting declarations for transform.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.codec.api cimport RequestHead, ResponseHead, field_names
from meshproxy.codec.framing cimport field_index

@cython.locals(i=Py_ssize_t)
cpdef _named_fields(headers, tuple names)
cpdef tuple client_fields(str client_ip, str scheme)
@cython.locals(names=tuple, out=list)
cpdef list forwarded_request_headers(RequestHead head, authority, tuple client, new_request_id, trace_fields=*)
@cython.locals(out=list)
cpdef list forwarded_response_headers(ResponseHead head, framing, bint keep_alive, bint upgrade=*)
