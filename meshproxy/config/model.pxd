# Augmenting declarations for model.py: the snapshot classes a request reads become extension-type
# dataclasses (@cython.dataclasses.dataclass(frozen=True) in model.py), so the compiled hot path
# reads their fields as C struct members instead of looking them up by name.  The other classes
# stay plain frozen dataclasses (each extension-type dataclass adds ~5k lines of C and build time).
# `readonly`: Python code cannot set the fields (frozen).  The field order here IS the __init__
# argument order: keep it identical to model.py.  Fields are `object` unless typed code follows a
# chain through them (route.headers.request).

cdef class StringMatch:
    cdef readonly str kind
    cdef readonly str value
    cdef readonly object regex
    cdef readonly bint ignore_case

cdef class HeaderMatch:
    cdef readonly str name
    cdef readonly StringMatch match

cdef class RouteMatch:
    cdef readonly object name
    cdef readonly StringMatch uri
    cdef readonly StringMatch scheme
    cdef readonly StringMatch method
    cdef readonly StringMatch authority
    cdef readonly tuple headers
    cdef readonly tuple without_headers
    cdef readonly tuple query_params
    cdef readonly object port
    cdef readonly object source_labels
    cdef readonly object gateways

cdef class HeaderOps:
    cdef readonly tuple set
    cdef readonly tuple add
    cdef readonly tuple remove

cdef class HeaderPolicy:
    cdef readonly HeaderOps request
    cdef readonly HeaderOps response

cdef class WeightedDestination:
    cdef readonly object host
    cdef readonly object subset
    cdef readonly object port
    cdef readonly object weight
    cdef readonly object cluster
    cdef readonly HeaderPolicy headers

cdef class RetryPolicy:
    cdef readonly object attempts
    cdef readonly object per_try_timeout
    cdef readonly object retry_on
    cdef readonly object retriable_status_codes
    cdef readonly object allow_non_idempotent
    cdef readonly object backoff_base
    cdef readonly bint ignore_previous_hosts

cdef class HttpRoute:
    cdef readonly object name
    cdef readonly object source
    cdef readonly tuple matches
    cdef readonly tuple destinations
    cdef readonly object redirect
    cdef readonly object direct_response
    cdef readonly object rewrite
    cdef readonly object timeout
    cdef readonly RetryPolicy retries
    cdef readonly object fault
    cdef readonly tuple mirrors
    cdef readonly HeaderPolicy headers
    cdef readonly object cors

cdef class VirtualHost:
    cdef readonly object name
    cdef readonly object domains
    cdef readonly tuple routes

cdef class RouteTable:
    cdef readonly object name
    cdef readonly object exact
    cdef readonly object wildcards
    cdef readonly object default

cdef class ProxySettings:
    cdef readonly object header_read_timeout
    cdef readonly object body_timeout
    cdef readonly object idle_timeout
    cdef readonly object upstream_connect_timeout
    cdef readonly object default_route_timeout
    cdef readonly object max_connections_per_listener
    cdef readonly object tcp_idle_timeout
    cdef readonly object drain_timeout

cdef class Snapshot:
    cdef readonly object version
    cdef readonly object listeners
    cdef readonly object route_tables
    cdef readonly object clusters
    cdef readonly object resources
    cdef readonly object warnings
    cdef readonly ProxySettings settings

cdef class Endpoint:
    cdef readonly object address
    cdef readonly object port
    cdef readonly object labels
    cdef readonly object weight
    cdef readonly object locality
