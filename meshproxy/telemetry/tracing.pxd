# Augmenting declarations for tracing.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy
from libc.stdint cimport int64_t, uint16_t, uint64_t

cdef extern from "<endian.h>":
    uint64_t htobe64(uint64_t) nogil
    uint64_t be64toh(uint64_t) nogil

ctypedef unsigned long long u64

cdef bytes _HEXDIGITS
cdef frozenset _READ
@cython.locals(name=bytes)
cdef bint _reads_any(tuple names) except -1

cdef u64 _U64

@cython.final
cdef class IdSource:
    cdef u64 _s0, _s1, _s2, _s3
    @cython.locals(s0=u64, s1=u64, s2=u64, s3=u64, x=u64, result=u64, t=u64)
    cpdef u64 next64(self)
    @cython.locals(i=int, v=u64)
    cdef void _fill(self, unsigned char* out, int words)

@cython.locals(raw=bytes, buf="unsigned char[16]")
cpdef bytes random_uuid(rng)
@cython.locals(raw=bytes, buf="unsigned char[40]", p="const unsigned char*", high=u64, span_bits=u64, low=u64)
cdef tuple _new_ids(rng)
cdef uint16_t _HEX_PAIRS[256]
cdef int _byte
cdef char* _pair
@cython.locals(i=int)
cdef inline char* _put_hex(char* w, const unsigned char* p, int start, int end)
cdef bytes _hex_text(const unsigned char* raw, int start, int end)
@cython.locals(w="char*", p="const unsigned char*")
cdef bytes _uuid_text(const unsigned char* raw)

cdef class TraceContext:
    cdef public bytes trace_id, span_id, parent_id, request_id, tracestate
    cdef public bint sampled, debug, b3_single, b3_multi
    cdef public str kind, scheme, peer_address
    cdef public int64_t start_ns
    cdef public bytes method, path, authority, user_agent

    @cython.locals(parts=list)
    cpdef bytes forward_block(self)

@cython.locals(n=Py_ssize_t)
cdef inline char* _put(char* w, bytes data)
@cython.locals(buf="char[1024]", w="char*", trace=bytes, span=bytes, parent=bytes, sampled=bint)
cdef bytes _forward_lines(TraceContext ctx)

cdef class ProxyTracer:
    cdef public object export, sample_rate, _bound, _rng, _clock_ns, _tracer, _ids, _record
    cdef public bint b3_single, b3_multi

    @cython.locals(ctx=TraceContext)
    cpdef TraceContext start(self, head_headers, str kind=*, bytes method=*, bytes path=*, bytes authority=*,
                             str scheme=*, str peer_address=*, names=*)
