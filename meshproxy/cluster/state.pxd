# Augmenting declarations for state.py (Cython experiment, branch cython-exp).
cdef class _Counters:
    cdef public Py_ssize_t pending, retries, connections, active
    cdef public dict overflow

cdef class ClusterState:
    cdef public object cluster, clock, rng, balancer, outlier, warmup
    cdef public str lb_name
    cdef public list hosts, _candidates
    cdef public bint passthrough, panic, _warming
    cdef public double min_health, _next_change
    cdef public Py_ssize_t max_pending, max_retries, max_connections
    cdef public _Counters counters
    cdef public dict _by_id, _by_key
