# Augmenting declarations for observe.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.config.model cimport WeightedDestination
from meshproxy.cluster.state cimport ClusterState
from meshproxy.telemetry.tracing cimport ProxyTracer, TraceContext
from meshproxy.codec.api cimport RequestHead, field_names
from meshproxy.telemetry.metrics cimport ProxyMetrics

cdef class RequestInfo:
    cdef public RequestHead head
    cdef public str client_ip, scheme, flags, route_name, details
    cdef public bint inbound
    cdef public int status, attempts
    cdef public WeightedDestination destination
    cdef public ClusterState cluster
    cdef public object endpoint, connection
    cdef public double start_time, upstream_start
    cdef public Py_ssize_t request_bytes, response_bytes
    cdef public TraceContext trace
    cdef public str upstream_identity
    cdef public bytes peer_metadata

cdef class Telemetry:
    cdef public ProxyTracer tracer
    cdef public ProxyMetrics metrics
    cdef public object access_log, source, _unrouted, _inbound, identity
    cdef public str reporter, _policy
    cdef public dict _handles, _tcp_handles, _inbound_mtls, _inbound_peers, _peer_handles
    cdef public object peer_exchange, peer_response_fields
    cdef public bytes peer_request_block

    @cython.locals(head=RequestHead)
    cpdef request_routed(self, RequestInfo exchange)
    @cython.locals(cluster=ClusterState, duration_ms=double)
    cpdef exchange_done(self, RequestInfo exchange, double now)
