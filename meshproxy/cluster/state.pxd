# Augmenting declarations for state.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.cluster.balancer cimport Host

cdef double _NEVER

cdef class _Counters:
    cdef public Py_ssize_t requests, pending, retries, connections, active
    cdef public dict overflow

cdef class ClusterState:
    cdef public object cluster, clock, rng, balancer, outlier, warmup
    cdef public str lb_name, name
    cdef public list hosts, _candidates
    cdef public bint passthrough, panic, _warming
    cdef public double min_health, _next_change
    cdef public Py_ssize_t max_requests, max_pending, max_retries, max_connections
    cdef public object idle_timeout
    cdef public Py_ssize_t max_idle_per_endpoint, max_requests_per_connection
    cdef public _Counters counters

    cpdef _refresh(self, double now)
    @cython.locals(host=Host)
    cpdef pick(self, hash_key=*, exclude=*, original=*)
    cpdef Host pick_host(self, hash_key=*, exclude=*, original=*)
    cpdef host_started(self, Host host)
    @cython.locals(counters=_Counters)
    cpdef host_finished(self, Host host)
    cpdef record_host(self, Host host, outcome)
    @cython.locals(c=_Counters)
    cpdef bint admit_request(self) except -1
    @cython.locals(c=_Counters)
    cpdef release_request(self)
    @cython.locals(c=_Counters)
    cpdef bint admit_pending(self) except -1
    @cython.locals(c=_Counters)
    cpdef release_pending(self)
    @cython.locals(c=_Counters)
    cpdef Py_ssize_t retry_budget(self) except -1
    @cython.locals(c=_Counters)
    cpdef bint admit_retry(self, bint budget=*) except -1
    @cython.locals(c=_Counters)
    cpdef release_retry(self)
    @cython.locals(c=_Counters)
    cpdef bint admit_connection(self) except -1
    cpdef force_connection(self)
    @cython.locals(c=_Counters)
    cpdef release_connection(self)

cdef class ClusterManager:
    cdef public object clock, rng
    cdef public dict _clusters
    cdef public bint _seen_update

    cpdef ClusterState get(self, name)
