# Augmenting declarations for split.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
cdef class _RouteSplit:
    cdef public object single, total, hash_policy
    cdef public list dests, weights, current, cuts, ordered
    cdef public dict _retry_states

    cpdef retry_state(self, policy, method, rng)
    @cython.locals(i=Py_ssize_t, best=Py_ssize_t)
    cpdef pick(self, hash_key)

cdef class Splitter:
    cdef public object snapshot, rng
    cdef public dict _by_id, _by_key, _old_by_key
    cdef object _last_route
    cdef _RouteSplit _last_split

    cdef _RouteSplit _add(self, route, clusters, old_by_key)
    cpdef _RouteSplit route_split(self, route)
