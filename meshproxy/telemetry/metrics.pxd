# Augmenting declarations for metrics.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython

cdef double[:] _BOUNDS

cdef class _HttpSeries:
    cdef public long long count, request_sum, response_sum
    cdef public double duration_sum
    cdef public long long[:] duration_buckets, request_buckets, response_buckets

    cpdef add(self, double duration_ms, long long request_bytes, long long response_bytes)

@cython.locals(bounds="double[:]", i=Py_ssize_t, n=Py_ssize_t)
cdef Py_ssize_t _bucket(double value) except -1

cdef class ProxyMetrics:
    cdef public object worker, instance
    cdef public bint enabled
    cdef public str _config_version
    cdef public list _http_static, _tcp_static, _sources
    cdef public dict _http_handles, _http, _plain, _tcp_handles, _tcp, _counters, _gauges

    @cython.locals(s=_HttpSeries)
    cpdef record_http(self, Py_ssize_t h, int status, str flags, double duration_ms, long long request_bytes,
                      long long response_bytes, str grpc_status=*)
    cdef _HttpSeries _http_series(self, Py_ssize_t h, int status, str flags, str grpc_status)
