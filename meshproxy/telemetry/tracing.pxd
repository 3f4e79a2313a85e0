# Augmenting declarations for tracing.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport int64_t

ctypedef unsigned long long u64

cdef bytes _HEXDIGITS
cdef u64 _UUID_HI_CLEAR, _UUID_HI_V4, _UUID_LO_CLEAR, _UUID_LO_VARIANT

@cython.locals(lo=u64)
cpdef bytes random_uuid(rng)
@cython.locals(span=u64, low=u64, high=u64, lo=u64, hi=u64)
cdef tuple _new_ids(rng)
@cython.locals(i=int, hexdigits="const char*")
cdef char* _put_hex(char* w, u64 value, int digits)
@cython.locals(w="char*")
cdef bytes _hex(u64 high, u64 low, int digits)
@cython.locals(w="char*")
cdef bytes _uuid(u64 hi, u64 lo)

cdef class TraceContext:
    cdef public bytes trace_id, span_id, parent_id, request_id, tracestate
    cdef public bint sampled, debug
    cdef public str kind, scheme, peer_address
    cdef public list headers_to_forward
    cdef public int64_t start_ns
    cdef public bytes method, path, authority, user_agent

cdef class ProxyTracer:
    cdef public object export, sample_rate, _bound, _rng, _clock_ns, _tracer, _ids, _record
    cdef public bint b3_single, b3_multi
