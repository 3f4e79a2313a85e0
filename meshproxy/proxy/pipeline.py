"""The life of a request through the proxy, in phase order.

An :class:`Exchange` is one request and its response.  It is callback-driven (no task
per request): the downstream driver feeds it the request's head, body and end; the
upstream connection feeds it the response.  The phases, in the order they run:

1. ``start``           read the snapshot once; route: virtual host -> route
2. ``_local_reply``    answers the proxy gives itself: CORS preflight, fault abort,
                       redirect, direct response (no upstream involved)
3. ``_choose_cluster`` weighted split picks a destination (sticky if the destination
                       service hashes); the destination names a cluster
4. ``_prepare_head``   the request as forwarded: hop-by-hop removed, X-Forwarded-*,
                       X-Request-Id, rewrites, header operations, re-framed body
5. ``_attempt``        load balancer picks an endpoint; pooled or new connection;
                       send head and the body received so far.  Retries loop back
                       here, never to parsing or routing.
6. ``request_body`` /  stream the request body with backpressure
   ``request_end``
7. ``upstream_response_head``  retry decision on status; response header operations;
                       head written downstream
8. ``upstream_body`` / ``upstream_complete``  stream the response; release the upstream
                       connection to its pool; ``_finish`` records metrics and logs and
                       lets the downstream connection start the next request.

Failures anywhere become a :class:`~meshproxy.proxy.errors.Failure` and go through
``_attempt_failed`` (retry or answer) — the one place errors turn into responses is
:func:`~meshproxy.proxy.errors.error_response`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..codec.api import (
    BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, ProtocolError, RequestHead, ResponseHead,
)
from ..codec.writer import (
    LAST_CHUNK, content_length_field, encode_chunk, encode_request_head, encode_response_head,
)
from ..config.model import NO_HEADER_POLICY
from ..router.match import select_route, select_virtual_host
from ..router.request import RequestView, view_from_head
from ..router.retry import RetryState
from ..router.split import hash_key_for
from ..security.authz import DENIED_BODY
from ..telemetry.tracing import random_uuid
from .errors import Failure, error_response
from .mirror import start_mirror
from .transform import (
    apply_header_ops, client_fields, cors_response_headers, forwarded_request_headers, forwarded_response_headers, local_reply_for,
    rewrite_path_and_authority,
)

if TYPE_CHECKING:
    from ..downstream.http_conn import DownstreamConnection
    from ..upstream.connection import UpstreamConnection

_MAX_RETAINED_BODY = 64 * 1024     # request body kept for replay on retry
_MAX_BUFFERED_BODY = 64 * 1024     # request body held while the upstream connects
_NO_BODY_STATUSES = frozenset((204, 304))
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# the trace fields go to the head as encoded lines: none to add as fields
_IN_BLOCK = ()
_READ_PAUSE_UPSTREAM = 1           # DownstreamConnection.read_paused_by bits
_READ_PAUSE_CONNECTING = 8


class Exchange:
    __slots__ = (
        "down", "worker", "head", "snapshot", "route", "destination", "cluster", "view",
        "endpoint", "host", "upstream", "forward_head", "pending_body", "retained_body", "retained_bytes",
        "request_complete", "request_bytes", "response_head", "response_started", "response_bytes",
        "response_chunked", "retry", "attempts", "tried", "flags", "status", "start_time",
        "upstream_start", "timer", "try_timer", "discarding", "finished", "keep_alive",
        "hash_key", "request_admitted", "pending_admitted", "retry_admitted", "waiting", "connect_task",
        "trace", "route_name",
        "close_delimited", "buffered_bytes", "upstream_paused", "request_discard",
        "forward_headers", "forward_path", "mirrors", "set_cookie", "switching", "up_out",
        "response_flushed", "reused", "stale_retried",
    )

    def __init__(self, down: "DownstreamConnection", head: RequestHead):
        self.down = down
        self.worker = self.down.worker           # (through the typed attributes: C reads when compiled)
        self.head = head
        self.snapshot = None
        self.route = None
        self.destination = None
        self.cluster = None
        self.view = None
        self.endpoint = None
        self.host = None                          # the cluster's Host of the endpoint (load, health)
        self.upstream: UpstreamConnection | None = None
        self.forward_head = b""
        self.pending_body: list[bytes] = []      # received, not yet sent upstream
        self.retained_body: list[bytes] | None = None   # sent, kept for a retry
        self.retained_bytes = 0
        self.buffered_bytes = 0
        self.request_complete = False
        self.request_bytes = 0
        self.response_head: ResponseHead | None = None
        self.response_started = False
        self.response_bytes = 0
        self.response_chunked = False
        self.close_delimited = False
        self.retry: RetryState | None = None
        self.attempts = 0
        self.tried: tuple = ()                   # (address, port) of the endpoints attempted
        self.flags = "-"
        self.status = 0
        self.start_time = self.down.since        # the first byte of this request (or when the previous one ended)
        self.upstream_start = 0.0
        self.timer = None
        self.try_timer = None
        self.discarding = False
        self.finished = False
        self.keep_alive = self.head.keep_alive
        self.hash_key = None
        self.request_admitted = False            # counted in the cluster's requests (http2MaxRequests)
        self.pending_admitted = False            # counted as waiting for a connection (http1MaxPendingRequests)
        self.retry_admitted = False
        self.waiting = None                      # the EndpointPool whose queue this exchange is in
        self.connect_task = None
        self.trace = None
        self.route_name = ""
        self.upstream_paused = False
        self.request_discard = False
        self.forward_headers = None
        self.forward_path = b""
        self.mirrors = None                      # MirrorCopy objects fed with the request body
        self.set_cookie = None                   # a sticky-session cookie the proxy issues
        self.switching = False                   # a 101 arrived; tunnel after this read
        self.up_out: list[bytes] = []            # upstream bytes held until the downstream read is parsed
        self.response_flushed = False            # some response bytes reached the socket
        self.reused = False                      # this attempt runs on a pooled keep-alive connection
        self.stale_retried = False

    # ================================================================ 1. route

    def start(self) -> None:
        worker = self.worker
        self.snapshot = snapshot = worker.snapshot
        listener = self.down.listener
        head = self.head
        if listener.authz is not None and not self._authorized(listener):
            return
        if head.upgrade == b"connect":
            return self._local_reply(501, "-")     # CONNECT tunnelling is not supported
        down = self.down
        if down.vhost_snapshot is snapshot and down.vhost_authority == head.host:
            vhost = down.vhost                 # as for the previous request on this connection
        else:
            table = snapshot.route_tables.get(listener.route_table) if snapshot else None
            vhost = select_virtual_host(table, head.host.decode("latin-1").lower()) if table else None
            if vhost is None and listener.fallback_table:    # captured: the original destination's service
                fallback = snapshot.route_tables.get(listener.fallback_table)
                vhost = fallback.default if fallback is not None else None
            down.vhost_snapshot = snapshot
            down.vhost_authority = head.host
            down.vhost = vhost
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
        if worker.telemetry.tracer is not None:
            worker.telemetry.request_routed(self)
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
        self._respond_local(403, [(b"content-type", b"text/plain")], DENIED_BODY, "RBAC")
        return False

    def request_view(self) -> RequestView:
        """What route matching and hashing see; built only when something needs it."""
        view = self.view
        if view is None:
            listener = self.down.listener
            view = self.view = view_from_head(self.head, listener.port, self.down.scheme, self.down.client_ip)
        return view

    # ================================================================ 2. local replies

    def _local_reply_for_route(self, match, after_delay: bool = False) -> bool:
        route = self.route
        reply = local_reply_for(route, match, self.head, self.request_view(), self.worker.rng, after_delay)
        if reply is None:
            return False
        kind, value = reply
        if kind == "delay":
            # fault delay: continue routing after the delay (flag DI), timer owned by the exchange
            self.flags = "DI"
            self.timer = self.worker.loop.call_later(value, self._after_fault_delay, match)
            return True
        status, extra_headers, body, flag = value
        self._respond_local(status, extra_headers, body, flag)
        return True

    def _after_fault_delay(self, match) -> None:
        self.timer = None
        if not self.finished and not self._local_reply_for_route(match, after_delay=True):
            self._choose_cluster(match)

    def _local_reply(self, status: int, flag: str) -> None:
        self.flags = flag
        self._write_local(error_response(status, flag, close=not self.keep_alive_now()), status)

    def _respond_local(self, status: int, headers: list, body: bytes, flag: str) -> None:
        self.flags = flag or "-"
        close = not self.keep_alive_now()
        hdrs = list(headers)
        hdrs.append((b"content-length", str(len(body)).encode()))
        if close:
            hdrs.append((b"connection", b"close"))
        if self.route is not None:
            hdrs = apply_header_ops(hdrs, self.route.headers.response)
        payload = encode_response_head(status, b"", hdrs)
        if self.head.method != b"HEAD":
            payload += body
        self._write_local(payload, status)

    def _write_local(self, payload: bytes, status: int) -> None:
        self.status = status
        self.response_started = True
        self.response_bytes = len(payload)
        self.down.write(payload)
        if self.request_complete:
            self._finish(self.keep_alive_now())
        else:
            # the request body is still arriving: read and discard it, then finish
            self.request_discard = True

    # ================================================================ 3. split -> cluster

    def _choose_cluster(self, match) -> None:
        worker = self.worker
        route = self.route
        if not route.destinations:
            return self._local_reply(404, "NR")
        split = worker.splitter.route_split(route)
        policy = split.hash_policy
        if policy is not None:
            self._choose_hash_key(policy)
        dest = split.pick(self.hash_key)
        if dest is None or not dest.cluster:
            return self._local_reply(503, "NR")
        self.destination = dest
        cluster = worker.clusters.get(dest.cluster)
        if cluster is None:
            return self._local_reply(503, "NR")
        self.cluster = cluster
        if not cluster.admit_request():
            worker.on_overflow(cluster)
            return self._local_reply(503, "UO")
        self.request_admitted = True
        retries = route.retries
        if retries is not None and retries.attempts > 0:
            self.retry = split.retry_state(retries, self.head.method, worker.rng)
            self.retained_body = []
        else:
            # a request that failed to connect on a fresh connection may still be
            # retried once on another endpoint (nothing was sent)
            self.retry = None
        timeout = route.timeout if route.timeout is not None else self.snapshot.settings.default_route_timeout
        if timeout is not None:
            self.timer = worker.loop.call_later(timeout, self._route_timeout)
        self._prepare_head(match)
        if route.mirrors:
            self._start_mirrors()
        self._attempt()

    def _start_mirrors(self) -> None:
        copies = [c for c in (start_mirror(self.worker, self, m) for m in self.route.mirrors) if c is not None]
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
            value = random_uuid(self.worker.rng)
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
        down = self.down
        client = down.client_fields
        if client is None:
            down.client_fields = client = client_fields(down.client_ip, down.scheme)
        headers = forwarded_request_headers(head, authority, client, self.worker.new_request_id,
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

    def _attempt(self) -> None:
        worker = self.worker
        cluster = self.cluster
        original = self._original_destination() if cluster.passthrough else None
        host = cluster.pick_host(self.hash_key, self.tried, original)
        if host is None and self.tried:
            host = cluster.pick_host(self.hash_key, (), original)    # every endpoint tried: allow repeats
        if host is None:
            return self._answer_failure(503, "UH")
        self.host = host
        self.endpoint = host.endpoint
        self.attempts += 1
        key = host.key                           # (address, port)
        self.tried = self.tried + (key,) if self.tried else (key,)
        if self.stale_retried:
            conn = None
        else:
            pool = host.pool
            if pool is None:              # the endpoint's pool, found by address once per Host
                pool = host.pool = worker.pools.pool(key)
            conn = worker.pools.acquire_idle_in(pool, cluster.idle_timeout)
        self.upstream_start = worker.now()
        if conn is not None:
            self._send_on(conn)
            return
        if not self.pending_admitted:
            if not cluster.admit_pending():
                worker.on_overflow(cluster)
                return self._answer_failure(503, "UO")
            self.pending_admitted = True
        self._connect_or_wait(key)

    def _connect_or_wait(self, key: tuple[str, int], first: bool = False) -> bool:
        """Open a connection to the chosen endpoint, or queue for one when the cluster is at
        maxConnections (Envoy's pending requests).  An endpoint with no connection at all
        always gets one, so a queue never waits on nothing.  False = queued."""
        worker = self.worker
        cluster = self.cluster
        pool = worker.pools.pool(key)
        if not cluster.admit_connection():
            if pool.active or pool.connecting:
                if not first:
                    worker.on_connection_overflow(cluster)
                pool.wait(self, first)
                self.waiting = pool
                return False
            cluster.force_connection()
        policy = cluster.cluster.policy.connection_pool
        timeout = min(policy.connect_timeout, self.snapshot.settings.upstream_connect_timeout)
        self.connect_task = worker.pools.connect(key, timeout, self._connected)
        return True

    def connection_available(self, conn: "UpstreamConnection | None") -> bool:
        """Offered by the endpoint's pool while this exchange waits (see _connect_or_wait)."""
        pool, self.waiting = self.waiting, None
        if conn is not None:
            self._send_on(conn)
            return True
        return self._connect_or_wait(pool.key, first=True)

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

    def _connected(self, conn, reason: str) -> None:
        self.connect_task = None
        if conn is None:
            self.cluster.release_connection()
            if reason == "cancelled":   # the exchange gave up (timeout, client gone, shutdown)
                return
            self.worker.telemetry.connect_failed(self.cluster.name)
            if not self.finished:
                self._attempt_failed(Failure.CONNECT_TIMEOUT if reason == "timeout" else Failure.CONNECT_FAILURE)
            return
        conn.on_close = self._connection_closed_callback()   # the cluster's connection slot lives as long as the socket
        if self.finished:
            self.worker.pools.release(conn, True, self.cluster.cluster.policy.connection_pool.max_idle_per_endpoint)
            return
        self._send_on(conn)

    def _connection_closed_callback(self):
        cluster = self.cluster
        telemetry = self.worker.telemetry
        name = cluster.name
        telemetry.upstream_cx_opened(name)

        def closed() -> None:
            cluster.release_connection()
            telemetry.upstream_cx_closed(name)
        return closed

    def _send_on(self, conn: "UpstreamConnection") -> None:
        if self.pending_admitted:
            self.pending_admitted = False
            self.cluster.release_pending()
        self.upstream = conn
        self.reused = conn.requests > 0
        conn.exchange = self
        self.cluster.host_started(self.host)
        per_try = self.route.retries.per_try_timeout if self.retry is not None else None
        if per_try is not None:
            self.try_timer = self.worker.loop.call_later(per_try, self._per_try_timeout)
        head = self.head
        if head.method == b"HEAD":
            conn.parser.expect_no_body()
        self._up_write(self.forward_head if head.body_kind == BODY_NONE and not self.pending_body
                       else self._head_and_body())
        if self.down.read_paused_by:
            self.down.resume_reading(_READ_PAUSE_CONNECTING)
        if self.head.expect_continue and not self.request_complete and self.attempts == 1:
            self.down.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.down.flush()

    def _head_and_body(self) -> bytes:
        """The forwarded head and the body received so far (a retry first replays what the
        first try sent); what is sent is kept for a retry when the route retries."""
        out = [self.forward_head]
        if self.retained_body:
            out.extend(self.retained_body)
        if self.pending_body:
            out.extend(self.pending_body)
            if self.retained_body is not None:
                self._retain(self.pending_body)
            self.pending_body = []
            self.buffered_bytes = 0
        if self.request_complete and self.head.body_kind == BODY_CHUNKED:
            out.append(LAST_CHUNK)
        return b"".join(out)

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
        if self.request_discard:
            return
        self.request_bytes += len(data)
        if self.head.body_kind == BODY_CHUNKED:
            data = encode_chunk(data)
        if self.mirrors is not None:
            for copy in self.mirrors:
                copy.feed(data)
        conn = self.upstream
        if conn is None:
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
        if self.request_discard:
            # local reply already written while the body was still arriving
            self._finish(self.keep_alive_now())
            return
        conn = self.upstream
        if conn is not None and self.head.body_kind == BODY_CHUNKED:
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
            self.upstream.write(data)

    def upstream_flush(self) -> None:
        """Called after a downstream read was parsed."""
        out = self.up_out
        if out:
            conn = self.upstream
            if conn is not None:
                conn.write(b"".join(out) if len(out) > 1 else out[0])
            out.clear()

    def upstream_write_paused(self) -> None:
        self.down.pause_reading(_READ_PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self.down.resume_reading(_READ_PAUSE_UPSTREAM)

    # ================================================================ 7. response head

    def upstream_response_head(self, head: ResponseHead) -> None:
        status = head.status
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        retry = self.retry
        if (retry is not None and status >= 400 and retry.should_retry(self.attempts, status)
                and self._retry_allowed()):
            # read this response to its end, then try again
            self.worker.clusters_record(self.cluster, self.host, status)
            self.discarding = True
            self.response_head = head
            return
        self.response_head = head
        self.status = status
        if status == 101:
            # hand over once the parser has finished this read (its leftovers are the tunnel's)
            self.switching = True
            return
        self.cluster.record_host(self.host, status)
        down = self.down
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
        self.response_started = True
        down.write(data)

    def _retry_allowed(self) -> bool:
        if self.retained_body is None:
            return False
        if not self.cluster.admit_retry():
            self.worker.on_retry_overflow(self.cluster)
            return False
        self.retry_admitted = True
        return True

    # ================================================================ 8. response body and end

    def upstream_body(self, data: bytes) -> None:
        if self.discarding:
            return
        if self.response_chunked:
            data = encode_chunk(data)
        self.response_bytes += len(data)
        self.down.write(data)

    def upstream_complete(self, conn: "UpstreamConnection") -> None:
        if self.switching:
            return
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        self._release_upstream(reusable=self.request_complete and self.response_head.keep_alive)
        if self.discarding and not self.finished and not self.response_started:
            self.discarding = False
            self.response_head = None
            self._schedule_retry()
            return
        if self.response_chunked:
            self.down.write(LAST_CHUNK)
            self.response_bytes += len(LAST_CHUNK)
        self.down.flush()
        self._finish(self.keep_alive_now() and not self.close_delimited)

    def downstream_flush(self) -> None:
        if self.switching:
            self.switching = False
            self._switch_protocols(self.response_head)
            return
        if self.down.out:
            self.down.flush()

    def downstream_write_paused(self) -> None:
        if self.upstream is not None and not self.upstream_paused:
            self.upstream_paused = True
            self.upstream.transport.pause_reading()

    def downstream_write_resumed(self) -> None:
        if self.upstream is not None and self.upstream_paused:
            self.upstream_paused = False
            self.upstream.transport.resume_reading()

    def _release_upstream(self, reusable: bool) -> None:
        conn = self.upstream
        if conn is None:
            return
        self.upstream = None
        if self.upstream_paused:
            self.upstream_paused = False
            conn.transport.resume_reading()
        cluster = self.cluster
        cluster.host_finished(self.host)
        self.worker.pools.release(conn, reusable, cluster.max_idle_per_endpoint, cluster.max_requests_per_connection)

    # ================================================================ upgrade (WebSocket)

    def _switch_protocols(self, head: ResponseHead) -> None:
        down = self.down
        if not self.head.upgrade:
            return self._attempt_failed(Failure.PROTOCOL_ERROR)
        headers = forwarded_response_headers(head, None, True, upgrade=True)
        down.write(encode_response_head(101, head.reason, headers))
        down.send_now()                      # before the tunnel writes to the socket itself
        conn = self.upstream
        self.upstream = None
        conn.exchange = None
        conn.pool.forget(conn)
        self.cluster.host_finished(self.host)
        self._cancel_timers()
        self._release_admissions()
        self.finished = True
        self.worker.on_exchange_done(self)
        down.exchange = None
        self.worker.start_tunnel(down, conn, down.take_tunnel_bytes(), conn.parser.unconsumed())

    # ================================================================ failures, timeouts, retries

    def upstream_reset(self, conn, exc) -> None:
        self._upstream_failed(conn, Failure.RESET_BEFORE_RESPONSE)

    def upstream_protocol_error(self, conn, err: ProtocolError) -> None:
        self._upstream_failed(conn, Failure.PROTOCOL_ERROR)

    def _upstream_failed(self, conn, failure: Failure) -> None:
        if conn is not self.upstream or self.finished:
            return
        self.upstream = None
        self.cluster.host_finished(self.host)
        conn.close()
        if self.response_started:
            # mid-body: the client must not see this response as complete
            self.flags = failure.flag
            self.down.abort()
            self._finish(False)
            return
        self._attempt_failed(failure)

    def _per_try_timeout(self) -> None:
        self.try_timer = None
        conn = self.upstream
        if conn is None or self.response_started:
            return
        self.upstream = None
        self.cluster.host_finished(self.host)
        conn.close()
        self._attempt_failed(Failure.PER_TRY_TIMEOUT)

    def _route_timeout(self) -> None:
        self.timer = None
        if self.finished:
            return
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            self.cluster.host_finished(self.host)
            conn.close()
        if self.host is not None:
            self.worker.clusters_record(self.cluster, self.host, "timeout")
        if self.response_started:
            self.flags = "UT"
            self.down.abort()
            self._finish(False)
            return
        self._answer_failure(504, "UT")

    def _attempt_failed(self, failure: Failure) -> None:
        if (failure is Failure.RESET_BEFORE_RESPONSE and self.reused and not self.stale_retried
                and self.head.method in _IDEMPOTENT
                and (self.head.body_kind == BODY_NONE or self.retained_body is not None)):
            # the upstream closed a keep-alive connection as we reused it (the classic
            # intermittent 503 UC): not the endpoint's fault, try once more on a new one
            self.stale_retried = True
            self.tried = ()
            return self._attempt()
        self.worker.clusters_record(self.cluster, self.host, failure.condition)
        retry = self.retry
        if retry is not None:
            if retry.should_retry(self.attempts, failure.condition) and self._retry_allowed():
                return self._schedule_retry()
            if self.attempts > 1:
                return self._answer_failure(failure.status, "URX")
        elif failure.retryable_before_send and self.attempts == 1:
            # issue #2 rule: a failed connect on a fresh connection may go to one other endpoint
            return self._attempt()
        self._answer_failure(failure.status, failure.flag)

    def _schedule_retry(self) -> None:
        self.worker.on_retry(self.cluster)
        delay = self.retry.backoff(self.attempts) if self.retry is not None else 0.0
        self.worker.loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        if self.finished:
            return
        if self.retry_admitted:
            self.cluster.release_retry()
            self.retry_admitted = False
        self._attempt()

    def _answer_failure(self, status: int, flag: str) -> None:
        self.flags = flag
        self.keep_alive = self.keep_alive and self.request_complete
        self._write_local(error_response(status, flag, close=not self.keep_alive_now()), status)
        self.down.flush()

    # ================================================================ end of the exchange

    def keep_alive_now(self) -> bool:
        return self.keep_alive and self.down.keep_alive and not self.worker.draining

    def _cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def _release_admissions(self) -> None:
        if self.request_admitted:
            self.cluster.release_request()
            self.request_admitted = False
        if self.pending_admitted:
            self.cluster.release_pending()
            self.pending_admitted = False
            if self.waiting is not None:
                self.waiting.stop_waiting(self)
                self.waiting = None
        if self.retry_admitted:
            self.cluster.release_retry()
            self.retry_admitted = False

    def _finish(self, keep_alive: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None or self.try_timer is not None:
            self._cancel_timers()
        if self.request_admitted or self.retry_admitted:
            self._release_admissions()
        if self.upstream is not None:
            self._release_upstream(reusable=False)
        if self.down.read_paused_by:
            self.down.resume_reading(_READ_PAUSE_CONNECTING | _READ_PAUSE_UPSTREAM)
        self.worker.telemetry.exchange_done(self, self.worker.now())
        self.down.exchange_finished(self, keep_alive)

    def downstream_lost(self) -> None:
        """The client went away: stop everything this exchange started."""
        if self.finished:
            return
        if not self.response_started:
            self.flags = "DC"
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.upstream is not None:
            conn, self.upstream = self.upstream, None
            self.cluster.host_finished(self.host)
            conn.close()
        self.finished = True
        self._cancel_timers()
        self._release_admissions()
        self.worker.on_exchange_done(self)

    def abandon(self) -> None:
        """The downstream connection is being rejected (a framing error in this request's
        body, or in a later pipelined request): whatever was held back for the upstream
        is dropped, and an upstream connection that already saw part of this request is
        reset, so the upstream never sees a complete request."""
        self.up_out.clear()
        self.downstream_lost()
