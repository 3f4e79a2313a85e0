# Augmenting declarations for balancer.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython

# Read and updated for every request (ClusterState.pick, on_request_start/end): C struct
# members instead of slot descriptors looked up through the type.
cdef class Host:
    cdef public object endpoint, key, weight, added_at, state, ejected_until, times_ejected
    cdef public object healthy_since, consecutive_5xx, consecutive_gateway, ejection_reason
    cdef public object ejections_overflowed, rr_current, index, pool, consecutive_local
    cdef public Py_ssize_t active
