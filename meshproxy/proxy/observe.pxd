# Augmenting declarations for observe.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.proxy.pipeline cimport Exchange
from meshproxy.cluster.state cimport ClusterState

cdef class Telemetry:
    cdef public object metrics, tracer, access_log, source, _unrouted, _inbound
    cdef public str reporter
    cdef public dict _handles, _tcp_handles

    @cython.locals(cluster=ClusterState, duration_ms=double)
    cpdef exchange_done(self, Exchange exchange, double now)
