# Augmenting declarations for transform.py (Cython experiment, branch cython-exp).
cimport cython
from meshproxy.codec.api cimport RequestHead, ResponseHead

cpdef _named_fields(headers, tuple names)
@cython.locals(names=tuple, out=list)
cpdef list forwarded_request_headers(RequestHead head, authority, str client_ip, str scheme, new_request_id, trace_fields=*)
@cython.locals(names=tuple, out=list)
cpdef list forwarded_response_headers(ResponseHead head, framing, bint keep_alive, bint upgrade=*)
