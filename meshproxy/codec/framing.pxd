# Augmenting declarations for framing.py (Cython experiment, branch cython-exp).
cimport cython
from meshproxy.codec.api cimport RequestHead, ResponseHead

cdef tuple _checked_fields(headers, limits, int status)
@cython.locals(names=tuple, values=tuple)
cpdef RequestHead request_head(method, target, version, headers, limits)
@cython.locals(names=tuple, values=tuple)
cpdef ResponseHead response_head(int status, reason, version, headers, limits, bint no_body)
