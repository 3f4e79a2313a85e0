"""The life of a request through the proxy, in phase order.

An :class:`Exchange` is one request and its response.  It is callback-driven (no task
per request): the downstream connection feeds it the request's head, body and end; each
try at an upstream is an :class:`Attempt`, which the upstream connection reports to.  The
exchange's ``phase`` says where it is:

    ROUTING ──> FORWARDING ──> RESPONDING ──> DONE
       │            │  ▲ (a retry: a new Attempt)
       └────────────┴──┴──> LOCAL (the proxy answers) ──> DONE

The steps, in the order they run:

1. ``start``           read the snapshot once; route: virtual host -> route
2. ``_local_reply``    answers the proxy gives itself: CORS preflight, fault abort,
                       redirect, direct response (no upstream involved)
3. ``_choose_cluster`` weighted split picks a destination (sticky if the destination
                       service hashes); the destination names a cluster
4. ``_prepare_head``   the request as forwarded: hop-by-hop removed, X-Forwarded-*,
                       X-Request-Id, rewrites, header operations, re-framed body
5. ``_new_attempt``    load balancer picks an endpoint; pooled or new connection;
                       send head and the body received so far.  Retries loop back
                       here with a new Attempt, never to parsing or routing.
6. ``request_body`` /  stream the request body with backpressure
   ``request_end``
7. ``_response_head``  retry decision on status; response header operations;
                       head written downstream
8. ``_response_body`` / ``_response_complete``  stream the response; the attempt's
                       connection goes back to its pool; ``_finish`` records metrics and
                       logs and lets the downstream connection start the next request.

Failures anywhere become a :class:`~meshproxy.proxy.errors.Failure` and go through
``_attempt_failed`` (retry or answer); the one place errors turn into responses is
:func:`~meshproxy.proxy.errors.error_response`.

The downstream connection is seen through :class:`Downstream` (what an exchange needs
from the connection that carries it), implemented by
:class:`~meshproxy.downstream.http_conn.DownstreamConnection`: the pipeline imports no
connection driver, and the drivers import the pipeline (along the flow of a request).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..codec.api import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, ProtocolError, RequestHead, ResponseHead
from ..codec.writer import (
    CHUNK_END, LAST_CHUNK, chunk_head, content_length_field, encode_chunk, encode_request_head,
    encode_response_head,
)
from ..config.model import NO_HEADER_POLICY
from ..driver import WRITE_HIGH_WATER, ConnectionDriver
from ..router.match import select_route, select_virtual_host
from ..router.request import RequestView, view_from_head
from ..router.retry import RetryState
from ..router.split import hash_key_for
from ..security.authz import DENIED_BODY
from ..telemetry.peer_metadata import metadata_value
from ..telemetry.tracing import random_uuid
from ..upstream.connection import READ_SIZE, UpstreamConnection, UpstreamHandler
from .errors import Failure, error_response
from .mirror import start_mirror
from .observe import RequestInfo
from .transform import (
    apply_header_ops, client_fields, cors_response_headers, forwarded_request_headers, forwarded_response_headers,
    local_reply_for, rewrite_path_and_authority,
)

if TYPE_CHECKING:
    from ..runtime import Runtime

_MAX_RETAINED_BODY = 64 * 1024     # request body kept for replay on retry
_MAX_BUFFERED_BODY = 64 * 1024     # request body held while the upstream connects
_NO_BODY_STATUSES = frozenset((204, 304))
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# the trace fields go to the head as encoded lines: none to add as fields
_IN_BLOCK = ()
# reasons a connection's reading is paused (ConnectionDriver.read_paused_by bits)
_READ_PAUSE_UPSTREAM = 1           # downstream: the upstream's write buffer is full
_READ_PAUSE_CONNECTING = 8         # downstream: body buffered while the upstream connects
_READ_PAUSE_DOWNSTREAM = 16        # upstream: the downstream's write buffer is full

# Exchange.phase
ROUTING = 0        # routing, choosing a cluster (also a fault delay)
FORWARDING = 1     # an attempt is connecting, queued, or waiting for the response head
RESPONDING = 2     # the upstream's response head went downstream; its body streams
LOCAL = 3          # the proxy answered itself; a request body still arriving is discarded
DONE = 4           # finished (answered, failed, client gone, or handed to a tunnel)


class Downstream(ConnectionDriver):
    """The downstream connection as an exchange sees it (what it reads, what it calls);
    :class:`~meshproxy.downstream.http_conn.DownstreamConnection` is the implementation."""
    __slots__ = ("runtime", "listener", "client_ip", "scheme", "inbound", "keep_alive", "feeding", "since",
                 "vhost_snapshot", "vhost_authority", "vhost", "client_fields", "write_paused")

    def exchange_finished(self, exchange: "Exchange", keep_alive: bool) -> None:
        """The exchange's response was written completely: the next request may start."""
        raise NotImplementedError

    def take_tunnel_bytes(self) -> bytes:
        """The exchange became a tunnel: the connection lets go of it and hands over the bytes
        the client sent after the request head."""
        raise NotImplementedError

    def virtual_host(self, snapshot, authority: bytes):
        """The virtual host ``authority`` routes to on this listener (as for the previous
        request on this connection when snapshot and Host repeat, as keep-alive clients do)."""
        if self.vhost_snapshot is snapshot and self.vhost_authority == authority:
            return self.vhost
        listener = self.listener
        table = snapshot.route_tables.get(listener.route_table) if snapshot else None
        vhost = select_virtual_host(table, authority.decode("latin-1").lower()) if table else None
        if vhost is None and listener.fallback_table:    # captured: the original destination's service
            fallback = snapshot.route_tables.get(listener.fallback_table)
            vhost = fallback.default if fallback is not None else None
        self.vhost_snapshot = snapshot
        self.vhost_authority = authority
        self.vhost = vhost
        return vhost

    def forwarded_client_fields(self) -> tuple:
        """X-Forwarded-For and -Proto for this client (made once per connection)."""
        fields = self.client_fields
        if fields is None:
            fields = self.client_fields = client_fields(self.client_ip, self.scheme)
        return fields


class Attempt(UpstreamHandler):
    """One try at an upstream: its endpoint, connection (pooled or new), try timer and
    admissions.  The upstream connection reports to the attempt, the attempt to its exchange;
    a retry makes a new attempt, so late events of an old one are recognised and dropped."""
    __slots__ = ("exchange", "host", "conn", "reused", "try_timer", "pending_admitted", "waiting",
                 "connect_task", "response_head", "discarding", "switching")

    def __init__(self, exchange: "Exchange", host):
        self.begin(exchange, host)

    def begin(self, exchange: "Exchange", host) -> None:
        """(``__init__``'s body: the pipeline makes attempts with ``Attempt.__new__`` and this,
        a C call when compiled instead of a Python-level constructor call.)"""
        self.exchange = exchange
        self.host = host                          # the cluster's Host of the endpoint (load, health)
        self.conn: UpstreamConnection | None = None
        self.reused = False                       # the connection served requests before this one
        self.try_timer = None
        self.pending_admitted = False             # counted as waiting for a connection (http1MaxPendingRequests)
        self.waiting = None                       # the EndpointPool whose queue this attempt is in
        self.connect_task = None
        self.response_head: ResponseHead | None = None
        self.discarding = False                   # reading a response to its end, then retrying
        self.switching = False                    # a 101 arrived; tunnel after this read

    # ---------------------------------------------------------------- the pool's callbacks

    def connection_available(self, conn: UpstreamConnection | None) -> bool:
        """Offered by the endpoint's pool while this attempt waits (see _connect_or_wait)."""
        pool, self.waiting = self.waiting, None
        exchange = self.exchange
        if conn is not None:
            exchange._send_on(self, conn)
            return True
        return exchange._connect_or_wait(self, pool.key, True)

    def connected(self, conn: UpstreamConnection | None, reason: str) -> None:
        """The pools' ``on_done`` for a connect this attempt started."""
        self.connect_task = None
        self.exchange._connected(self, conn, reason)

    def try_timed_out(self) -> None:
        self.try_timer = None
        self.exchange._per_try_timeout(self)

    # ---------------------------------------------------------------- the connection's events

    def upstream_response_head(self, head: ResponseHead) -> None:
        self.exchange._response_head(self, head)

    def upstream_body(self, data: bytes) -> None:
        if not self.discarding:
            self.exchange._response_body(data)

    def upstream_complete(self) -> None:
        if not self.switching:
            self.exchange._response_complete(self)

    def upstream_read_done(self) -> None:
        if self.switching:
            self.switching = False
            self.exchange._switch_protocols(self)
            return
        exchange = self.exchange
        down = exchange.down
        if down.out:
            if exchange.phase == RESPONDING:
                # a response still streaming goes to the socket now, read by read, not at the
                # end of the loop pass: libuv may read this upstream several times in one
                # pass, and only a write tells whether the client keeps up (pause_writing);
                # the next read takes at most what the client's side has room for
                down.send_now()
                conn = self.conn
                if conn is not None and not down.write_paused:
                    conn.read_size = WRITE_HIGH_WATER - down.transport.get_write_buffer_size()
            else:
                down.flush()

    def upstream_reset(self, exc) -> None:
        self.exchange._upstream_failed(self, Failure.RESET_BEFORE_RESPONSE)

    def upstream_protocol_error(self, err: ProtocolError) -> None:
        self.exchange._upstream_failed(self, Failure.PROTOCOL_ERROR)

    def upstream_write_paused(self) -> None:
        self.exchange.down.pause_reading(_READ_PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self.exchange.down.resume_reading(_READ_PAUSE_UPSTREAM)

    def cancel_try_timer(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None


class Exchange(RequestInfo):
    __slots__ = (
        "down", "runtime", "phase", "snapshot", "route", "view", "host", "attempt",
        "forward_head", "pending_body", "retained_body", "retained_bytes", "buffered_bytes",
        "request_complete", "response_head", "response_chunked", "close_delimited",
        "retry", "tried", "timer", "retry_timer", "keep_alive", "hash_key",
        "request_admitted", "retry_admitted", "forward_headers", "forward_path", "mirrors",
        "set_cookie", "up_out", "stale_retried",
    )

    def __init__(self, down: Downstream, head: RequestHead):
        self.begin(down, head)

    def begin(self, down: Downstream, head: RequestHead) -> None:
        """(``__init__``'s body: the downstream connection makes exchanges with
        ``Exchange.__new__`` and this, a C call when compiled.)"""
        self.down = down
        self.runtime = down.runtime               # (through the typed attributes: C reads when compiled)
        self.phase = ROUTING
        self.head = head
        self.connection = down                    # (telemetry's view of the downstream connection)
        self.client_ip = down.client_ip
        self.scheme = down.scheme                 # the listener's
        self.inbound = down.inbound               # a sidecar's ingress: reports as the destination
        self.snapshot = None
        self.route = None
        self.route_name = ""
        self.destination = None
        self.cluster = None
        self.view = None
        self.host = None                          # the current attempt's Host
        self.endpoint = None                      # and its endpoint
        self.attempt: Attempt | None = None       # the current (or last) try at an upstream
        self.attempts = 0
        self.tried: tuple = ()                    # (address, port) of the endpoints attempted
        self.forward_head = b""
        self.forward_headers = None
        self.forward_path = b""
        self.pending_body: list[bytes] = []       # received, not yet sent upstream
        self.retained_body: list[bytes] | None = None   # sent, kept for a retry
        self.retained_bytes = 0
        self.buffered_bytes = 0
        self.up_out: list[bytes] = []             # upstream bytes held until the downstream read is parsed
        self.request_complete = False
        self.request_bytes = 0
        self.response_head: ResponseHead | None = None   # the one forwarded downstream
        self.response_bytes = 0
        self.response_chunked = False
        self.close_delimited = False
        self.status = 0
        self.flags = "-"
        self.details = ""                         # %RESPONSE_CODE_DETAILS% of a local reply that sets one
        self.start_time = down.since              # the first byte of this request (or when the previous one ended)
        self.upstream_start = 0.0
        self.retry: RetryState | None = None
        self.timer = None                         # the route timeout, or a fault delay
        self.retry_timer = None                   # a retry's backoff
        self.keep_alive = head.keep_alive
        self.hash_key = None
        self.request_admitted = False             # counted in the cluster's requests (http2MaxRequests)
        self.retry_admitted = False               # counted in the cluster's retries (maxRetries)
        self.trace = None
        self.mirrors = None                       # MirrorCopy objects fed with the request body
        self.set_cookie = None                    # a sticky-session cookie the proxy issues
        self.stale_retried = False
        self.upstream_identity = ""               # the sidecar's SPIFFE id, over mesh mTLS
        self.peer_metadata = None                 # and the peer metadata it answered with

    def body_outstanding(self) -> bool:
        """Request body bytes are still to come from the client."""
        return not self.request_complete and self.head.body_kind != BODY_NONE

    def response_started(self) -> bool:
        """Response bytes (the upstream's or the proxy's own) were written downstream."""
        return self.phase == RESPONDING or self.phase == LOCAL

    # ================================================================ 1. route

    def start(self) -> None:
        runtime = self.runtime
        self.snapshot = snapshot = runtime.snapshot
        head = self.head
        listener = self.down.listener
        if listener.authz is not None and not self._authorized(listener):
            return
        if head.upgrade == b"connect":
            return self._local_reply(501, "-")     # CONNECT tunnelling is not supported
        vhost = self.down.virtual_host(snapshot, head.host)
        if vhost is None:
            return self._local_reply(404, "NR")
        routes = vhost.routes
        first = routes[0] if routes else None
        if first is not None and not first.matches:
            found = (first, None)              # the first route matches everything: no view needed
        else:
            found = select_route(vhost, self.request_view())
        if found is None:
            return self._local_reply(404, "NR")
        self.route, match = found
        route = self.route
        self.route_name = route.name
        if runtime.telemetry.tracer is not None:
            self.trace = runtime.telemetry.request_routed(self)
        if (route.fault is not None or route.redirect is not None or route.direct_response is not None
                or route.cors is not None) and self._local_reply_for_route(match):
            return
        self._choose_cluster(match)

    def _authorized(self, listener) -> bool:
        """AuthorizationPolicy (inbound and gateway listeners): a denied request gets
        Envoy's RBAC answer, 403 ``RBAC: access denied``, and goes no further."""
        decision = listener.authorize(self.down, self.request_view())
        if decision.allowed:
            return True
        self.details = decision.details
        self._respond_local(403, [(b"content-type", b"text/plain")], DENIED_BODY, "-")
        return False

    def request_view(self) -> RequestView:
        """What route matching and hashing see; built only when something needs it."""
        view = self.view
        if view is None:
            view = self.view = view_from_head(self.head, self.down.listener.port, self.scheme, self.client_ip)
        return view

    # ================================================================ 2. local replies

    def _local_reply_for_route(self, match, after_delay: bool = False) -> bool:
        route = self.route
        reply = local_reply_for(route, match, self.head, self.request_view(), self.runtime.rng, after_delay)
        if reply is None:
            return False
        kind, value = reply
        if kind == "delay":
            # fault delay: continue routing after the delay (flag DI), timer owned by the exchange
            self.flags = "DI"
            self.timer = self.runtime.loop.call_later(value, self._after_fault_delay, match)
            return True
        status, extra_headers, body, flag = value
        self._respond_local(status, extra_headers, body, flag)
        return True

    def _after_fault_delay(self, match) -> None:
        self.timer = None
        if self.phase != DONE and not self._local_reply_for_route(match, after_delay=True):
            self._choose_cluster(match)

    def _local_reply(self, status: int, flag: str) -> None:
        self.flags = flag
        if self.keep_alive and self.body_outstanding():
            self.keep_alive = False
        self._write_local(error_response(status, flag, close=not self.keep_alive_now()), status)

    def _respond_local(self, status: int, headers: list, body: bytes, flag: str) -> None:
        self.flags = flag or "-"
        if self.keep_alive and self.body_outstanding():
            self.keep_alive = False
        close = not self.keep_alive_now()
        hdrs = list(headers)
        hdrs.append((b"content-length", str(len(body)).encode()))
        if close:
            hdrs.append((b"connection", b"close"))
        if self.route is not None:
            hdrs = apply_header_ops(hdrs, self.route.headers.response)
        self._write_local(encode_response_head(status, b"", hdrs), status,
                          body if self.head.method != b"HEAD" else b"")

    def _write_local(self, head: bytes, status: int, body: bytes = b"") -> None:
        self.status = status
        self.phase = LOCAL
        self.response_bytes = len(head) + len(body)
        self.down.write(head)
        if body:
            self.down.write(body)
        if self.request_complete:
            self._finish(self.keep_alive_now())
        elif self.head.body_kind != BODY_NONE:
            # answered before the request body arrived (its head says Connection: close): as
            # Envoy does for HTTP/1, the connection closes after this answer rather than wait
            # for a body that may never come; what still arrives is read and dropped
            self._finish(False)
        # else the request's end follows in this read (request_end finishes)

    # ================================================================ 3. split -> cluster

    def _choose_cluster(self, match) -> None:
        runtime = self.runtime
        route = self.route
        if not route.destinations:
            return self._local_reply(404, "NR")
        split = runtime.splitter.route_split(route)
        policy = split.hash_policy
        if policy is not None:
            self._choose_hash_key(policy)
        dest = split.pick(self.hash_key)
        if dest is None or not dest.cluster:
            return self._local_reply(503, "NR")
        self.destination = dest
        cluster = runtime.clusters.get(dest.cluster)
        if cluster is None:
            return self._local_reply(503, "NR")
        self.cluster = cluster
        if not cluster.admit_request():
            runtime.telemetry.overflow(cluster.name)
            return self._local_reply(503, "UO")
        self.request_admitted = True
        retries = route.retries
        if retries is not None and retries.attempts > 0:
            self.retry = split.retry_state(retries, self.head.method, runtime.rng)
            self.retained_body = []
        else:
            # a request that failed to connect on a fresh connection may still be
            # retried once on another endpoint (nothing was sent)
            self.retry = None
        timeout = route.timeout if route.timeout is not None else self.snapshot.settings.default_route_timeout
        if timeout is not None:
            self.timer = runtime.loop.call_later(timeout, self._route_timeout)
        self._prepare_head(match)
        if route.mirrors:
            self._start_mirrors()
        self._new_attempt()

    def _start_mirrors(self) -> None:
        copies = [c for c in (start_mirror(self.runtime, self, m) for m in self.route.mirrors) if c is not None]
        if copies:
            self.mirrors = copies
            if self.request_complete:
                self._complete_mirrors()

    def _complete_mirrors(self) -> None:
        for copy in self.mirrors:
            copy.complete()
        self.mirrors = None

    def _choose_hash_key(self, policy) -> None:
        """Sticky canaries: the destination service hashes, so the version choice and
        the endpoint choice both follow the user's key.  A cookie policy with a ttl
        makes the proxy issue the cookie when the request has none (as Envoy does)."""
        key = hash_key_for(policy, self.request_view())
        if key is None and policy.key == "cookie" and policy.cookie_ttl is not None:
            value = random_uuid(self.runtime.rng)
            self.set_cookie = (b"%s=%s; Path=%s; Max-Age=%d; HttpOnly" % (
                policy.name.encode("latin-1"), value, policy.cookie_path.encode("latin-1"), int(policy.cookie_ttl)))
            key = value
        self.hash_key = key

    # ================================================================ 4. the forwarded request head

    def _prepare_head(self, match) -> None:
        head = self.head
        route = self.route
        if route.rewrite is None:
            path, authority = head.path, head.host
        else:
            path, authority = rewrite_path_and_authority(route, match, head)
        # With tracing on, the tracer supplies x-request-id along with the trace fields: as lines
        # already encoded (appended to the head by the writer) unless header operations or
        # mirrors need them as fields.
        trace = self.trace
        ops = route.headers is not NO_HEADER_POLICY or self.destination.headers is not NO_HEADER_POLICY
        block = trace is not None and not ops and not route.mirrors
        headers = forwarded_request_headers(head, authority, self.down.forwarded_client_fields(), self.runtime.new_request_id,
                                            None if trace is None else _IN_BLOCK if block else trace.headers_to_forward)
        if ops:
            if route.headers is not NO_HEADER_POLICY:
                headers = apply_header_ops(headers, route.headers.request)
            if self.destination.headers is not NO_HEADER_POLICY:
                headers = apply_header_ops(headers, self.destination.headers.request)
        kind = head.body_kind
        if kind == BODY_LENGTH:
            headers.append((b"content-length", str(head.content_length).encode()))
        elif kind == BODY_CHUNKED:
            headers.append((b"transfer-encoding", b"chunked"))
        self.forward_headers = headers
        self.forward_path = path
        self.forward_head = encode_request_head(head.method, path, headers, trace.forward_block() if block else b"")

    # ================================================================ 5. endpoint, connection, send

    def _new_attempt(self) -> None:
        runtime = self.runtime
        cluster = self.cluster
        self.phase = FORWARDING
        original = self._original_destination() if cluster.passthrough else None
        avoid = self.tried
        if avoid and self.retry is not None and not self.route.retries.ignore_previous_hosts:
            avoid = ()           # retryIgnorePreviousHosts: false: the failed endpoint may be picked again
        host = cluster.pick_host(self.hash_key, avoid, original)
        if host is None and avoid:
            host = cluster.pick_host(self.hash_key, (), original)    # every endpoint tried: allow repeats
        if host is None:
            return self._answer_failure(503, "UH")
        previous = self.attempt
        if previous is not None:
            self._end_attempt(previous, False)
        attempt = self.attempt = Attempt.__new__(Attempt)
        attempt.begin(self, host)
        self.host = host
        self.endpoint = host.endpoint
        self.attempts += 1
        key = host.key                           # (address, port)
        self.tried = self.tried + (key,) if self.tried else (key,)
        if self.stale_retried:
            conn = None                          # the last pooled connection was stale: a new one
        else:
            pool = host.pool
            if pool is None:              # the endpoint's pool, found by address once per Host
                pool = host.pool = runtime.pools.pool(key)
            conn = runtime.pools.acquire_idle_in(pool, cluster.idle_timeout)
        self.upstream_start = runtime.now()
        if conn is not None:
            self._send_on(attempt, conn)
            return
        if not cluster.admit_pending():
            runtime.telemetry.overflow(cluster.name)
            return self._answer_failure(503, "UO")
        attempt.pending_admitted = True
        self._connect_or_wait(attempt, key)

    def _connect_or_wait(self, attempt: Attempt, key: tuple[str, int], first: bool = False) -> bool:
        """Open a connection to the chosen endpoint, or queue for one when the cluster is at
        maxConnections (Envoy's pending requests).  An endpoint with no connection at all
        always gets one, so a queue never waits on nothing.  False = queued."""
        runtime = self.runtime
        cluster = self.cluster
        pool = runtime.pools.pool(key)
        if not cluster.admit_connection():
            if pool.active or pool.connecting:
                if not first:
                    runtime.telemetry.connection_overflow(cluster.name)
                pool.wait(attempt, first)
                attempt.waiting = pool
                return False
            cluster.force_connection()
        policy = cluster.cluster.policy.connection_pool
        timeout = min(policy.connect_timeout, self.snapshot.settings.upstream_connect_timeout)
        attempt.connect_task = runtime.pools.connect(key, timeout, attempt.connected, policy.tcp_keepalive,
                                                     policy.max_connection_duration)
        return True

    def _original_destination(self) -> tuple[str, int] | None:
        """PASSTHROUGH load balancing: a captured connection's original destination, else the
        address the request named (its authority)."""
        original = self.down.listener.original_dst
        if original is not None:
            return original
        host, _, port = self.head.host.decode("latin-1").rpartition(":")
        if not host or not port.isdigit():
            host, port = self.head.host.decode("latin-1"), str(self.cluster.cluster.port)
        return host, int(port)

    def _connected(self, attempt: Attempt, conn: UpstreamConnection | None, reason: str) -> None:
        cluster = self.cluster
        if conn is None:
            cluster.release_connection()
            if reason == "cancelled":   # the attempt was given up (timeout, client gone, shutdown)
                return
            self.runtime.telemetry.connect_failed(cluster.name)
            if attempt is self.attempt and self.phase != DONE:
                self._end_attempt(attempt, False)
                self._attempt_failed(Failure.CONNECT_TIMEOUT if reason == "timeout" else Failure.CONNECT_FAILURE)
            return
        conn.on_close = self._connection_closed_callback()   # the cluster's connection slot lives as long as the socket
        if attempt is not self.attempt or self.phase == DONE:
            self.runtime.pools.release(conn, True, cluster.cluster.policy.connection_pool.max_idle_per_endpoint)
            return
        self._send_on(attempt, conn)

    def _connection_closed_callback(self):
        cluster = self.cluster
        telemetry = self.runtime.telemetry
        name = cluster.name
        telemetry.upstream_cx_opened(name)

        def closed() -> None:
            cluster.release_connection()
            telemetry.upstream_cx_closed(name)
        return closed

    def _send_on(self, attempt: Attempt, conn: UpstreamConnection) -> None:
        if attempt.pending_admitted:
            attempt.pending_admitted = False
            self.cluster.release_pending()
        attempt.conn = conn
        attempt.reused = conn.requests > 0
        conn.handler = attempt
        conn.read_size = READ_SIZE
        down = self.down
        if down.write_paused:
            # the client is not reading what it was sent already (a pipelined request's
            # predecessor): read this response only as it drains
            conn.pause_reading(_READ_PAUSE_DOWNSTREAM)
        self.cluster.host_started(attempt.host)
        per_try = self.route.retries.per_try_timeout if self.retry is not None else None
        if per_try is not None:
            attempt.try_timer = self.runtime.loop.call_later(per_try, attempt.try_timed_out)
        head = self.head
        if head.method == b"HEAD":
            conn.parser.expect_no_body()
        forward_head = self.forward_head
        identity = conn.peer_identity
        self.upstream_identity = identity
        if identity:
            # a sidecar over mesh mTLS: this workload's peer metadata goes with the request
            block = self.runtime.telemetry.peer_request_block
            if block:
                forward_head = forward_head[:-2] + block + b"\r\n"
        if head.body_kind == BODY_NONE and not self.pending_body:
            self._up_write(forward_head)
        else:
            self._send_head_and_body(forward_head)
        if down.read_paused_by:
            down.resume_reading(_READ_PAUSE_CONNECTING)
        if head.expect_continue and not self.request_complete and self.attempts == 1:
            down.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            down.flush()

    def _send_head_and_body(self, forward_head: bytes) -> None:
        """The forwarded head and the body received so far (a retry first replays what the
        first try sent); what is sent is kept for a retry when the route retries."""
        self._up_write(forward_head)
        if self.retained_body:
            for chunk in self.retained_body:
                self._up_write(chunk)
        pending = self.pending_body
        if pending:
            for chunk in pending:
                self._up_write(chunk)
            if self.retained_body is not None:
                self._retain(pending)
            self.pending_body = []
            self.buffered_bytes = 0
        if self.request_complete and self.head.body_kind == BODY_CHUNKED:
            self._up_write(LAST_CHUNK)

    def _retain(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.retained_bytes += len(chunk)
        if self.retained_bytes > _MAX_RETAINED_BODY:
            self.retained_body = None        # too big to replay: no more retries
            self.retry = None
        else:
            self.retained_body.extend(chunks)

    # ================================================================ 6. request body

    def request_body(self, data: bytes) -> None:
        if self.phase == LOCAL or self.phase == DONE:
            return                               # answered already: the body is read and dropped
        self.request_bytes += len(data)
        if self.head.body_kind == BODY_CHUNKED:
            data = encode_chunk(data)
        if self.mirrors is not None:
            for copy in self.mirrors:
                copy.feed(data)
        attempt = self.attempt
        if attempt is None or attempt.conn is None:
            self.pending_body.append(data)
            self.buffered_bytes += len(data)
            if self.buffered_bytes > _MAX_BUFFERED_BODY:
                self.down.pause_reading(_READ_PAUSE_CONNECTING)
            return
        self._up_write(data)
        if self.retained_body is not None:
            self._retain([data])

    def request_end(self) -> None:
        self.request_complete = True
        if self.mirrors is not None:
            if self.head.body_kind == BODY_CHUNKED:
                for copy in self.mirrors:
                    copy.feed(LAST_CHUNK)
            self._complete_mirrors()
        if self.phase == LOCAL:
            # a local reply was written while the body was still arriving
            self._finish(self.keep_alive_now())
            return
        attempt = self.attempt
        if attempt is not None and attempt.conn is not None and self.head.body_kind == BODY_CHUNKED:
            self._up_write(LAST_CHUNK)
            if self.retained_body is not None:
                self._retain([LAST_CHUNK])

    def _up_write(self, data: bytes) -> None:
        """Bytes for the upstream.  While the downstream read that produced them is still
        being parsed they are held, so that a framing error later in the same read
        forwards nothing at all; ``upstream_flush`` sends them once the read is done."""
        if self.down.feeding:
            self.up_out.append(data)
        else:
            conn = self.attempt.conn
            conn.write(data)
            conn.flush()

    def upstream_flush(self) -> None:
        """Called after a downstream read was parsed: what it produced goes upstream."""
        out = self.up_out
        if out:
            attempt = self.attempt
            if attempt is not None and attempt.conn is not None:
                conn = attempt.conn
                for data in out:
                    conn.write(data)             # queued, then sent as one (vectored) write
                conn.flush()
            out.clear()

    # ================================================================ 7. response head

    def _response_head(self, attempt: Attempt, head: ResponseHead) -> None:
        status = head.status
        attempt.cancel_try_timer()
        attempt.response_head = head
        retry = self.retry
        if (retry is not None and status >= 400 and retry.should_retry(self.attempts, status)
                and self._retry_allowed()):
            # read this response to its end, then try again
            self.cluster.record_host(attempt.host, status)
            attempt.discarding = True
            return
        self.response_head = head
        self.status = status
        if self.upstream_identity:
            self.peer_metadata = metadata_value(head)      # who answered (read; never forwarded)
        if status == 101:
            # hand over once the parser has finished this read (its leftovers are the tunnel's)
            attempt.switching = True
            return
        self.cluster.record_host(attempt.host, status)
        if self.keep_alive and self.body_outstanding():
            # the upstream answers before the request body ended: the connection closes after
            # this response (Envoy on HTTP/1), so a stalled body is not held past the answer
            self.keep_alive = False
        keep_alive = self.keep_alive_now()
        kind = head.body_kind
        if kind == BODY_LENGTH and status not in _NO_BODY_STATUSES and self.head.method != b"HEAD":
            framing = content_length_field(head.content_length)
        elif kind == BODY_NONE or self.head.method == b"HEAD" or status in _NO_BODY_STATUSES:
            framing = None
        elif self.head.version == b"1.1":
            framing = (b"transfer-encoding", b"chunked")
            self.response_chunked = True
        else:
            framing = None                  # HTTP/1.0 client: body delimited by close
            self.close_delimited = True
            keep_alive = self.keep_alive = False
        headers = forwarded_response_headers(head, framing, keep_alive)
        if self.inbound:
            self._answer_peer_metadata(headers)
        if self.destination.headers is not NO_HEADER_POLICY:
            headers = apply_header_ops(headers, self.destination.headers.response)
        if self.route.headers is not NO_HEADER_POLICY:
            headers = apply_header_ops(headers, self.route.headers.response)
        if self.set_cookie is not None:
            headers.append((b"set-cookie", self.set_cookie))
        if self.route.cors is not None:
            origin = self.request_view().headers.get("origin")
            if origin:
                headers.extend(cors_response_headers(self.route.cors, origin))
        data = encode_response_head(status, head.reason, headers)
        self.response_bytes += len(data)
        self.phase = RESPONDING
        self.down.write(data)

    def _answer_peer_metadata(self, headers: list) -> None:
        """A sidecar's answer to a mesh peer that sent its metadata over mutual TLS carries this
        workload's (Istio's downstream propagation: only to a caller that sent its own)."""
        fields = self.runtime.telemetry.peer_response_fields
        if fields is not None and metadata_value(self.head) is not None:
            down = self.down
            if down.listener.peer(down).mutual_tls:
                headers.extend(fields)

    def _retry_allowed(self, before_send: bool = False) -> bool:
        if self.retained_body is None:
            return False
        # A failed connect sent nothing: retrying it on another endpoint adds no load to the
        # upstreams, so it does not spend the retry budget (which is there against retry
        # storms) while another endpoint is there to take it.
        spare = before_send and self.cluster.has_endpoint_besides(self.tried)
        if not self.cluster.admit_retry(not spare):
            self.runtime.telemetry.retry_overflow(self.cluster.name)
            return False
        self.retry_admitted = True
        return True

    # ================================================================ 8. response body and end

    def _response_body(self, data: bytes) -> None:
        down = self.down
        if self.response_chunked:
            n = len(data)
            if n:                                # an empty chunk would end the body
                line = chunk_head(n)
                down.write(line)                 # framing and data as separate buffers
                down.write(data)
                down.write(CHUNK_END)
                self.response_bytes += len(line) + n + len(CHUNK_END)
            return
        self.response_bytes += len(data)
        down.write(data)

    def _response_complete(self, attempt: Attempt) -> None:
        self._end_attempt(attempt, self.request_complete and attempt.response_head.keep_alive)
        if attempt.discarding:
            if self.phase == FORWARDING:
                self._schedule_retry()
            return
        if self.response_chunked:
            self.down.write(LAST_CHUNK)
            self.response_bytes += len(LAST_CHUNK)
        self.down.flush()
        self._finish(self.keep_alive_now() and not self.close_delimited)

    def downstream_write_paused(self) -> None:
        attempt = self.attempt
        if attempt is not None and attempt.conn is not None:
            attempt.conn.pause_reading(_READ_PAUSE_DOWNSTREAM)

    def downstream_write_resumed(self) -> None:
        attempt = self.attempt
        if attempt is not None and attempt.conn is not None:
            conn = attempt.conn
            conn.read_size = WRITE_HIGH_WATER - self.down.transport.get_write_buffer_size()
            conn.resume_reading(_READ_PAUSE_DOWNSTREAM)

    def _end_attempt(self, attempt: Attempt, reusable: bool) -> None:
        """The attempt is over: its timer, its place in a queue, its connect, its connection
        (back to the endpoint's pool when ``reusable``, else closed)."""
        attempt.cancel_try_timer()
        if attempt.pending_admitted:
            attempt.pending_admitted = False
            self.cluster.release_pending()
            if attempt.waiting is not None:
                attempt.waiting.stop_waiting(attempt)
                attempt.waiting = None
        if attempt.connect_task is not None:
            attempt.connect_task.cancel()        # its on_done ("cancelled") gives the connection slot back
            attempt.connect_task = None
        conn = attempt.conn
        if conn is not None:
            attempt.conn = None
            if conn.read_paused_by:
                conn.resume_reading(_READ_PAUSE_DOWNSTREAM)
            cluster = self.cluster
            cluster.host_finished(attempt.host)
            if reusable:
                self.runtime.pools.release(conn, True, cluster.max_idle_per_endpoint,
                                           cluster.max_requests_per_connection)
            else:
                conn.handler = None
                conn.close()

    # ================================================================ upgrade (WebSocket)

    def _switch_protocols(self, attempt: Attempt) -> None:
        down = self.down
        if not self.head.upgrade:
            return self._upstream_failed(attempt, Failure.PROTOCOL_ERROR)
        head = attempt.response_head
        headers = forwarded_response_headers(head, None, True, upgrade=True)
        down.write(encode_response_head(101, head.reason, headers))
        down.send_now()                      # before the tunnel writes to the socket itself
        conn = attempt.conn
        attempt.conn = None
        conn.handler = None
        conn.pool.forget(conn)
        self.cluster.host_finished(attempt.host)
        self._cancel_timers()
        self._release_admissions()
        self.phase = DONE
        attempt = self.attempt            # ends; exchange and attempt refer to each other: let go
        if attempt is not None:
            self.attempt = None
            self._end_attempt(attempt, False)
        runtime = self.runtime
        runtime.telemetry.exchange_done(self, runtime.now())
        to_upstream = down.take_tunnel_bytes()
        runtime.start_tunnel(down, conn, to_upstream, conn.parser.unconsumed())

    # ================================================================ failures, timeouts, retries

    def _upstream_failed(self, attempt: Attempt, failure: Failure) -> None:
        if attempt is not self.attempt or self.phase == DONE or attempt.conn is None:
            return
        self._end_attempt(attempt, False)
        if self.phase == RESPONDING:
            # mid-body: the client must not see this response as complete
            self.flags = failure.flag
            self.down.abort()
            self._finish(False)
            return
        self._attempt_failed(failure)

    def _per_try_timeout(self, attempt: Attempt) -> None:
        if attempt is not self.attempt or self.phase != FORWARDING or attempt.conn is None:
            return
        self._end_attempt(attempt, False)
        self._attempt_failed(Failure.PER_TRY_TIMEOUT)

    def _route_timeout(self) -> None:
        self.timer = None
        if self.phase == DONE:
            return
        attempt = self.attempt
        if attempt is not None:
            self._end_attempt(attempt, False)
            self.cluster.record_host(attempt.host, "timeout")
        if self.phase == RESPONDING:
            self.flags = "UT"
            self.down.abort()
            self._finish(False)
            return
        self._answer_failure(504, "UT")

    def _attempt_failed(self, failure: Failure) -> None:
        attempt = self.attempt
        if (failure is Failure.RESET_BEFORE_RESPONSE and attempt.reused and not self.stale_retried
                and self.head.method in _IDEMPOTENT
                and (self.head.body_kind == BODY_NONE or self.retained_body is not None)):
            # the upstream closed a keep-alive connection as we reused it (the classic
            # intermittent 503 UC): not the endpoint's fault, try once more on a new one
            self.stale_retried = True
            self.tried = ()
            return self._new_attempt()
        self.cluster.record_host(attempt.host, failure.condition)
        retry = self.retry
        if retry is not None:
            if retry.should_retry(self.attempts, failure.condition) and \
                    self._retry_allowed(failure.retryable_before_send):
                return self._schedule_retry()
            if self.attempts > 1:
                return self._answer_failure(failure.status, "URX")
        elif failure.retryable_before_send and self.attempts == 1:
            # issue #2 rule: a failed connect on a fresh connection may go to one other endpoint
            return self._new_attempt()
        self._answer_failure(failure.status, failure.flag)

    def _schedule_retry(self) -> None:
        self.runtime.telemetry.retry(self.cluster.name)
        delay = self.retry.backoff(self.attempts) if self.retry is not None else 0.0
        self.retry_timer = self.runtime.loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self.retry_timer = None
        if self.phase == DONE:
            return
        if self.retry_admitted:
            self.cluster.release_retry()
            self.retry_admitted = False
        self._new_attempt()

    def _answer_failure(self, status: int, flag: str) -> None:
        self.flags = flag
        if self.keep_alive and self.body_outstanding():
            self.keep_alive = False
        self._write_local(error_response(status, flag, close=not self.keep_alive_now()), status)
        self.down.flush()

    # ================================================================ end of the exchange

    def keep_alive_now(self) -> bool:
        return self.keep_alive and self.down.keep_alive and not self.runtime.draining

    def _cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None

    def _release_admissions(self) -> None:
        if self.request_admitted:
            self.cluster.release_request()
            self.request_admitted = False
        if self.retry_admitted:
            self.cluster.release_retry()
            self.retry_admitted = False

    def _finish(self, keep_alive: bool) -> None:
        if self.phase == DONE:
            return
        self.phase = DONE
        if self.timer is not None or self.retry_timer is not None:
            self._cancel_timers()
        if self.request_admitted or self.retry_admitted:
            self._release_admissions()
        attempt = self.attempt            # ends; exchange and attempt refer to each other: let go
        if attempt is not None:
            self.attempt = None
            self._end_attempt(attempt, False)
        down = self.down
        if down.read_paused_by:
            down.resume_reading(_READ_PAUSE_CONNECTING | _READ_PAUSE_UPSTREAM)
        runtime = self.runtime
        runtime.telemetry.exchange_done(self, runtime.now())
        down.exchange_finished(self, keep_alive)

    def downstream_lost(self) -> None:
        """The client went away: stop everything this exchange started."""
        if self.phase == DONE:
            return
        if not self.response_started():
            self.flags = "DC"
        self.phase = DONE
        attempt = self.attempt            # ends; exchange and attempt refer to each other: let go
        if attempt is not None:
            self.attempt = None
            self._end_attempt(attempt, False)
        self._cancel_timers()
        self._release_admissions()
        runtime = self.runtime
        runtime.telemetry.exchange_done(self, runtime.now())

    def abandon(self) -> None:
        """The downstream connection is being rejected (a framing error in this request's
        body, or in a later pipelined request): whatever was held back for the upstream
        is dropped, and an upstream connection that already saw part of this request is
        reset, so the upstream never sees a complete request."""
        self.up_out.clear()
        self.downstream_lost()
