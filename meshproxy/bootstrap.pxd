# Augmenting declarations for bootstrap.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
from meshproxy.upstream.pool cimport UpstreamPools
from meshproxy.proxy.observe cimport Telemetry
from meshproxy.router.split cimport Splitter
from meshproxy.clock cimport monotonic
from meshproxy.batch cimport SendBatch
from meshproxy.cluster.state cimport ClusterManager

cdef class Worker:
    cdef public object loop, store, options, rng, new_request_id, clock, settings, snapshot
    cdef public Telemetry telemetry
    cdef public bint draining, system_clock
    cdef public Py_ssize_t downstream_active
    cdef public dict http_listeners, tcp_listeners, capture_listeners
    cdef public set tunnels, mirror_tasks
    cdef public ClusterManager clusters
    cdef public object _request_parser, _sweeper
    cdef public Splitter splitter
    cdef public UpstreamPools pools
    cdef public SendBatch batch
    cdef public list listen_errors
    cdef public object certificates
    cpdef double now(self) except? -1.0
