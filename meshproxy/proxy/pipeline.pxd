# Augmenting declarations for pipeline.py: the types of the compiled hot path (scripts/build_ext.py).
# The .py file stays the reference and the pure-Python fallback; keep the two in step.
cimport cython
from meshproxy.driver cimport ConnectionDriver
from meshproxy.upstream.connection cimport UpstreamConnection, UpstreamHandler
from meshproxy.upstream.pool cimport EndpointPool
from meshproxy.cluster.state cimport ClusterState
from meshproxy.cluster.balancer cimport Host
from meshproxy.codec.api cimport RequestHead, ResponseHead
from meshproxy.runtime cimport Runtime
from meshproxy.config.model cimport Snapshot, HttpRoute, WeightedDestination, RouteTable, VirtualHost, RetryPolicy, Endpoint
from meshproxy.router.split cimport _RouteSplit
from meshproxy.router.request cimport view_from_head
from meshproxy.router.match cimport select_virtual_host, select_route
from meshproxy.telemetry.tracing cimport TraceContext
from meshproxy.codec.writer cimport encode_request_head, encode_response_head, encode_chunk, chunk_head, content_length_field
from meshproxy.proxy.observe cimport RequestInfo

cdef int BODY_CHUNKED, BODY_LENGTH, BODY_NONE
cdef int ROUTING, FORWARDING, RESPONDING, LOCAL, DONE
cdef Py_ssize_t READ_SIZE, WRITE_HIGH_WATER

from meshproxy.proxy.transform cimport client_fields, forwarded_request_headers, forwarded_response_headers

cdef class Downstream(ConnectionDriver):
    cdef public Runtime runtime
    cdef public object listener
    cdef public str client_ip, scheme
    cdef public bint inbound, keep_alive, feeding, write_paused
    cdef public double since
    cdef public object vhost_snapshot, vhost
    cdef public bytes vhost_authority
    cdef public tuple client_fields

    cpdef exchange_finished(self, exchange, bint keep_alive)
    cpdef bytes take_tunnel_bytes(self)
    @cython.locals(table=RouteTable)
    cpdef virtual_host(self, snapshot, bytes authority)
    cpdef tuple forwarded_client_fields(self)

@cython.freelist(8)       # one per request: allocated from a small free list
cdef class Attempt(UpstreamHandler):
    cdef public Exchange exchange
    cdef public Host host
    cdef public UpstreamConnection conn
    cdef public bint reused, pending_admitted, discarding, switching
    cdef public object try_timer, waiting, connect_task
    cdef public ResponseHead response_head

    cdef begin(self, Exchange exchange, Host host)
    cpdef bint connection_available(self, conn) except -1
    cpdef connected(self, conn, str reason)
    cpdef try_timed_out(self)
    cpdef upstream_response_head(self, ResponseHead head)
    cpdef upstream_body(self, data)
    cpdef upstream_complete(self)
    @cython.locals(exchange=Exchange, down=Downstream, conn=UpstreamConnection)
    cpdef upstream_read_done(self)
    cpdef upstream_reset(self, exc)
    cpdef upstream_protocol_error(self, err)
    cpdef upstream_write_paused(self)
    cpdef upstream_write_resumed(self)
    cdef cancel_try_timer(self)

@cython.freelist(8)
cdef class Exchange(RequestInfo):
    cdef public Downstream down
    cdef public Runtime runtime
    cdef public int phase
    cdef public Snapshot snapshot
    cdef public HttpRoute route
    cdef public object view
    cdef public Host host
    cdef public Attempt attempt
    cdef public bytes forward_head
    cdef public list pending_body
    cdef public list retained_body
    cdef public Py_ssize_t retained_bytes, buffered_bytes
    cdef public bint request_complete, response_chunked, close_delimited
    cdef public ResponseHead response_head
    cdef public object retry
    cdef public tuple tried
    cdef public object timer, retry_timer, hash_key
    cdef public bint keep_alive, request_admitted, retry_admitted, stale_retried
    cdef public list forward_headers, mirrors, up_out
    cdef public bytes forward_path
    cdef public object set_cookie

    # entry points called by the connection drivers (and Python code)
    cpdef begin(self, Downstream down, RequestHead head)
    cpdef bint response_started(self) except -1
    cpdef bint body_outstanding(self) except -1
    @cython.locals(runtime=Runtime, snapshot=Snapshot, vhost=VirtualHost, routes=tuple, first=HttpRoute,
                   route=HttpRoute)
    cpdef start(self)
    cpdef request_view(self)
    @cython.locals(attempt=Attempt)
    cpdef request_body(self, data)
    @cython.locals(attempt=Attempt)
    cpdef request_end(self)
    @cython.locals(attempt=Attempt, conn=UpstreamConnection, out=list)
    cpdef upstream_flush(self)
    cpdef bint keep_alive_now(self) except -1
    @cython.locals(attempt=Attempt)
    cpdef downstream_write_paused(self)
    @cython.locals(attempt=Attempt, conn=UpstreamConnection)
    cpdef downstream_write_resumed(self)
    cpdef downstream_lost(self)
    cpdef abandon(self)

    # internal steps, only called from compiled code
    cdef bint _local_reply_for_route(self, match, bint after_delay=*) except -1
    cdef _local_reply(self, int status, str flag)
    cdef _respond_local(self, int status, list headers, bytes body, str flag)
    cdef _write_local(self, bytes head, int status, bytes body=*)
    @cython.locals(runtime=Runtime, cluster=ClusterState, split=_RouteSplit, route=HttpRoute, dest=WeightedDestination,
                   retries=RetryPolicy)
    cdef _choose_cluster(self, match)
    cdef _start_mirrors(self)
    cdef _complete_mirrors(self)
    cdef _choose_hash_key(self, policy)
    @cython.locals(kind=int, head=RequestHead, route=HttpRoute, trace=TraceContext, ops=bint, block=bint)
    cdef _prepare_head(self, match)
    @cython.locals(runtime=Runtime, cluster=ClusterState, conn=UpstreamConnection, host=Host, key=tuple, pool=EndpointPool,
                   attempt=Attempt, previous=Attempt)
    cdef _new_attempt(self)
    @cython.locals(runtime=Runtime, cluster=ClusterState)
    cdef bint _connect_or_wait(self, Attempt attempt, tuple key, bint first=*) except -1
    cdef _original_destination(self)
    @cython.locals(cluster=ClusterState)
    cdef _connected(self, Attempt attempt, conn, str reason)
    @cython.locals(head=RequestHead, down=Downstream, forward_head=bytes, identity=str, block=bytes)
    cdef _send_on(self, Attempt attempt, UpstreamConnection conn)
    @cython.locals(pending=list)
    cdef _send_head_and_body(self, bytes forward_head)
    cdef _retain(self, list chunks)
    @cython.locals(conn=UpstreamConnection)
    cdef _up_write(self, data)
    @cython.locals(status=int, kind=int, keep_alive=bint)
    cdef _response_head(self, Attempt attempt, ResponseHead head)
    @cython.locals(down=Downstream)
    cdef _answer_peer_metadata(self, list headers)
    cdef bint _retry_allowed(self, bint before_send=*) except -1
    @cython.locals(down=Downstream, n=Py_ssize_t, line=bytes)
    cdef _response_body(self, data)
    cdef _response_complete(self, Attempt attempt)
    @cython.locals(conn=UpstreamConnection, cluster=ClusterState)
    cdef _end_attempt(self, Attempt attempt, bint reusable)
    @cython.locals(down=Downstream, conn=UpstreamConnection, runtime=Runtime)
    cdef _switch_protocols(self, Attempt attempt)
    cdef _upstream_failed(self, Attempt attempt, failure)
    cdef _per_try_timeout(self, Attempt attempt)
    @cython.locals(attempt=Attempt)
    cdef _attempt_failed(self, failure)
    cdef _schedule_retry(self)
    cdef _answer_failure(self, int status, str flag)
    cdef _cancel_timers(self)
    cdef _release_admissions(self)
    @cython.locals(down=Downstream, runtime=Runtime)
    cdef _finish(self, bint keep_alive)
