# Augmenting declarations for match.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
# Only the virtual host lookup is typed: a C call from the pipeline, C reads of the table.
cimport cython
from meshproxy.config.model cimport RouteTable, VirtualHost

@cython.locals(vhost=VirtualHost, wildcards=tuple, host=str, dot=Py_ssize_t)
cpdef VirtualHost select_virtual_host(RouteTable table, str authority)
