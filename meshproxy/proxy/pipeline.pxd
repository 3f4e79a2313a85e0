# Augmenting declarations for pipeline.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.downstream.http_conn cimport DownstreamConnection
from meshproxy.upstream.connection cimport UpstreamConnection
from meshproxy.upstream.pool cimport EndpointPool
from meshproxy.cluster.state cimport ClusterState
from meshproxy.cluster.balancer cimport Host
from meshproxy.codec.api cimport RequestHead, ResponseHead
from meshproxy.bootstrap cimport Worker
from meshproxy.config.model cimport Snapshot, HttpRoute, WeightedDestination, RouteTable, VirtualHost, RetryPolicy, Endpoint
from meshproxy.router.split cimport _RouteSplit
from meshproxy.router.request cimport view_from_head
from meshproxy.router.match cimport select_virtual_host, select_route
from meshproxy.telemetry.tracing cimport TraceContext
from meshproxy.codec.writer cimport encode_request_head, encode_response_head, encode_chunk, content_length_field

cdef int BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE

from meshproxy.proxy.transform cimport client_fields, forwarded_request_headers, forwarded_response_headers

cdef class Exchange:
    cdef public DownstreamConnection down
    cdef public RequestHead head
    cdef public ResponseHead response_head
    cdef public Worker worker
    cdef public Snapshot snapshot
    cdef public HttpRoute route
    cdef public WeightedDestination destination
    cdef public object view, endpoint
    cdef public Host host
    cdef public ClusterState cluster
    cdef public UpstreamConnection upstream
    cdef public bytes forward_head
    cdef public list pending_body
    cdef public list retained_body
    cdef public Py_ssize_t retained_bytes, buffered_bytes, request_bytes, response_bytes
    cdef public bint request_complete, response_started, response_chunked, close_delimited
    cdef public object retry
    cdef public int attempts, status
    cdef public tuple tried
    cdef public str flags, route_name
    cdef public double start_time, upstream_start
    cdef public object timer, try_timer, hash_key, connect_task
    cdef public TraceContext trace
    cdef public bint discarding, finished, keep_alive, request_admitted, pending_admitted, retry_admitted
    cdef public object waiting
    cdef public bint upstream_paused, request_discard, switching, response_flushed, reused, stale_retried
    cdef public list forward_headers, mirrors, up_out
    cdef public bytes forward_path
    cdef public object set_cookie

    # entry points called by the connection drivers (and Python code)
    @cython.locals(down=DownstreamConnection, snapshot=Snapshot, table=RouteTable, vhost=VirtualHost, routes=tuple, first=HttpRoute,
                   route=HttpRoute)
    cpdef start(self)
    cpdef request_view(self)
    cpdef request_body(self, data)
    cpdef request_end(self)
    cpdef upstream_flush(self)
    @cython.locals(status=int, kind=int, keep_alive=bint, down=DownstreamConnection)
    cpdef upstream_response_head(self, ResponseHead head)
    cpdef upstream_body(self, data)
    cpdef upstream_complete(self, conn)
    cpdef downstream_flush(self)
    cpdef bint keep_alive_now(self) except -1
    cpdef downstream_lost(self)
    cpdef abandon(self)
    cpdef bint connection_available(self, conn) except -1

    # internal steps, only called from compiled code
    cdef bint _local_reply_for_route(self, match, bint after_delay=*) except -1
    cdef _local_reply(self, int status, str flag)
    cdef _respond_local(self, int status, list headers, bytes body, str flag)
    cdef _write_local(self, bytes payload, int status)
    @cython.locals(worker=Worker, cluster=ClusterState, split=_RouteSplit, route=HttpRoute, dest=WeightedDestination,
                   retries=RetryPolicy)
    cdef _choose_cluster(self, match)
    cdef _start_mirrors(self)
    cdef _complete_mirrors(self)
    cdef _choose_hash_key(self, policy)
    @cython.locals(kind=int, head=RequestHead, route=HttpRoute, trace=TraceContext, ops=bint, block=bint,
                   down=DownstreamConnection, client=tuple)
    cdef _prepare_head(self, match)
    @cython.locals(worker=Worker, cluster=ClusterState, conn=UpstreamConnection, host=Host, key=tuple, pool=EndpointPool)
    cdef _attempt(self)
    @cython.locals(worker=Worker, cluster=ClusterState)
    cdef bint _connect_or_wait(self, tuple key, bint first=*) except -1
    cdef _original_destination(self)
    cdef _send_on(self, UpstreamConnection conn)
    cdef bytes _head_and_body(self)
    cdef _retain(self, list chunks)
    cdef _up_write(self, data)
    cdef bint _retry_allowed(self) except -1
    @cython.locals(conn=UpstreamConnection, cluster=ClusterState)
    cdef _release_upstream(self, bint reusable)
    cdef _switch_protocols(self, ResponseHead head)
    cdef _upstream_failed(self, conn, failure)
    cdef _attempt_failed(self, failure)
    cdef _schedule_retry(self)
    cdef _answer_failure(self, int status, str flag)
    cdef _cancel_timers(self)
    cdef _release_admissions(self)
    cdef _finish(self, bint keep_alive)
