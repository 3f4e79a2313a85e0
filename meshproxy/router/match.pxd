# Augmenting declarations for match.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
# Typed: the virtual host lookup and the route selection (a C call from the pipeline, C reads
# of the table and of the match blocks).
cimport cython
from meshproxy.config.model cimport RouteTable, VirtualHost, HttpRoute, RouteMatch, StringMatch, HeaderMatch
from meshproxy.router.request cimport RequestView

@cython.locals(vhost=VirtualHost, wildcards=tuple, host=str, dot=Py_ssize_t)
cpdef VirtualHost select_virtual_host(RouteTable table, str authority)

cdef bint _same(str a, str b) except -1
@cython.locals(kind=str)
cpdef bint string_matches(StringMatch sm, str value) except -1
@cython.locals(value=str)
cdef bint _header_matches(HeaderMatch hm, dict headers) except -1
@cython.locals(headers=dict, hm=HeaderMatch, params=dict, value=str, sm=StringMatch)
cpdef bint block_matches(RouteMatch m, RequestView req) except -1
@cython.locals(route=HttpRoute, m=RouteMatch)
cpdef tuple select_route(VirtualHost vhost, RequestView req)
