# Augmenting declarations for pipeline.py (Cython experiment, branch cython-exp).
from meshproxy.downstream.http_conn cimport DownstreamConnection
from meshproxy.upstream.connection cimport UpstreamConnection

cdef class Exchange:
    cdef public DownstreamConnection down
    cdef public object worker, head, snapshot, route, destination, cluster, view, endpoint
    cdef public UpstreamConnection upstream
    cdef public bytes forward_head
    cdef public list pending_body
    cdef public list retained_body
    cdef public Py_ssize_t retained_bytes, buffered_bytes, request_bytes, response_bytes
    cdef public bint request_complete, response_started, response_chunked, close_delimited
    cdef public object response_head, retry
    cdef public int attempts, status
    cdef public tuple tried
    cdef public str flags, route_name
    cdef public double start_time, upstream_start
    cdef public object timer, try_timer, hash_key, connect_task, trace
    cdef public bint discarding, finished, keep_alive, pending_admitted, retry_admitted
    cdef public bint upstream_paused, request_discard, switching, response_flushed, reused, stale_retried
    cdef public list forward_headers, mirrors, up_out
    cdef public bytes forward_path
    cdef public object set_cookie
