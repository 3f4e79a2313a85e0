# Augmenting declarations for observe.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.proxy.pipeline cimport Exchange
from meshproxy.cluster.state cimport ClusterState
from meshproxy.telemetry.tracing cimport ProxyTracer
from meshproxy.codec.api cimport RequestHead, field_names
from meshproxy.telemetry.metrics cimport ProxyMetrics

cdef class Telemetry:
    cdef public ProxyTracer tracer
    cdef public ProxyMetrics metrics
    cdef public object access_log, source, _unrouted, _inbound
    cdef public str reporter
    cdef public dict _handles, _tcp_handles, _inbound_mtls

    @cython.locals(head=RequestHead)
    cpdef request_routed(self, Exchange exchange)
    @cython.locals(cluster=ClusterState, duration_ms=double)
    cpdef exchange_done(self, Exchange exchange, double now)
