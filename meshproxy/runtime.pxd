# Augmenting declarations for runtime.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
from meshproxy.upstream.pool cimport UpstreamPools
from meshproxy.proxy.observe cimport Telemetry
from meshproxy.router.split cimport Splitter
from meshproxy.clock cimport monotonic
from meshproxy.batch cimport SendBatch
from meshproxy.cluster.state cimport ClusterManager

cdef class Runtime:
    cdef public object loop, rng, clock, new_request_id, make_request_parser, snapshot, settings
    cdef public bint system_clock, draining
    cdef public Telemetry telemetry
    cdef public ClusterManager clusters
    cdef public UpstreamPools pools
    cdef public SendBatch batch
    cdef public Splitter splitter
    cdef public set tunnels, mirror_tasks
    cpdef double now(self) except? -1.0
