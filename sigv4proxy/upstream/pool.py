"""The upstream connection pool: connections per origin, fair queuing, retries of what was never answered.

Owns: choosing/opening connections (protocol from the origin and ALPN), the per-origin limit,
the FIFO queue of requests waiting for a slot, retries (a stream the upstream never processed,
RetryableStreamError, for any method; a request a reused connection lost before any answer,
UnansweredReset, once on a new connection for idempotent methods), each counted by its reason,
and the stats for gauges. Bookkeeping is synchronous; I/O comes after. Must never: touch h2 state,
retry a request whose streamed body was already pulled, retry a non-idempotent request the
upstream may have processed, or wait without a bound.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from sigv4proxy.errors import (
    Overloaded,
    ProxyError,
    RetryableStreamError,
    UnansweredReset,
    UpstreamConnectError,
)
from sigv4proxy.model import Origin, PoolLimits, Timeouts
from sigv4proxy.upstream.base import (
    Body,
    Connection,
    ConnectionFactory,
    ConnectionNotAvailable,
    Interim,
    Response,
    choose_protocol,
    open_transport,
)
from sigv4proxy.upstream.body import IteratedBody, StreamedBody
from sigv4proxy.upstream.http1 import HTTP1Connection
from sigv4proxy.upstream.tls import make_client_ssl_context

# RFC 9110 §9.2.2: a request the upstream may have processed is sent again only for these
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_MAX_NOT_AVAILABLE = 16  # "available" connections that then refuse: a bug guard, never a spin
# New connections in a row that could take no request (GOAWAY or a stream limit of 0 straight
# after setup): the upstream is refusing, and opening more would only spin.
_MAX_UNUSABLE_OPENS = 3


@dataclass(frozen=True, slots=True)
class PoolStats:
    connections: dict[tuple[str, str], int]  # (protocol "h2"/"http1", state "active"/"idle") -> n
    streams_active: int
    requests_waiting: int


class _OriginPool:
    __slots__ = ("origin", "connections", "ready", "waiters", "connecting", "protocol", "woken", "expiry")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.connections: dict[Connection, None] = {}  # open and handed out (an ordered set)
        # Listed connections that had a free slot when they last reported (may hold some that
        # filled since): `pick` is O(1) however many HTTP/1.1 sockets are open.
        self.ready: dict[Connection, None] = {}
        # Queued requests and their deadlines, in arrival order (so deadlines ascend, but for the
        # few woken waiters that go back to the head). One lazy timer, `expiry`, serves them all.
        self.waiters: deque[tuple[asyncio.Future[bool], float]] = deque()
        self.expiry: asyncio.TimerHandle | None = None
        self.connecting = 0
        # Waiters told a slot is free that have not run yet: the slot is theirs. Without this
        # count a second wake-up (or a newcomer) takes it, the first waiter goes back to the
        # queue, and under load a few requests lose that race again and again (seconds of p99).
        self.woken = 0
        # known up front for plain http; learned from ALPN for https "auto"
        self.protocol: str | None = None
        if origin.scheme == "http" or origin.protocol == "http1":
            self.protocol = "h2" if origin.protocol == "h2" else "http1"

    def pick(self) -> Connection | None:
        ready = self.ready
        while ready:
            conn = next(iter(ready))
            if conn.is_available():
                return conn
            del ready[conn]  # full since it reported: it reports again when a slot frees
        return None

    def changed(self, conn: Connection) -> None:
        """A connection reported a freed slot, readiness or its close. One still being opened
        is not listed yet: the request that opened it gets its first slot."""
        if conn.is_closed():
            self.forget(conn)
        elif conn.is_available() and conn in self.connections:
            self.ready[conn] = None

    def forget(self, conn: Connection) -> None:
        self.ready.pop(conn, None)
        self.connections.pop(conn, None)

    def free_slots(self, limit: int) -> int:
        """Requests the connections could take now, plus the connections we may still open."""
        free = 0
        full = None
        for conn in self.ready:
            slots = conn.capacity()
            if slots:
                free += slots
            elif full is None:
                full = [conn]
            else:
                full.append(conn)
        if full is not None:  # as in pick: a full connection reports again when a slot frees
            for conn in full:
                del self.ready[conn]
        if self.can_open(limit):
            free += limit - len(self.connections) - self.connecting if self.protocol == "http1" else 1
        return free

    def can_open(self, limit: int) -> bool:
        if len(self.connections) + self.connecting >= limit:
            return False
        # HTTP/1.1 needs a socket per request; HTTP/2 (or not yet known) opens one at a time
        return self.protocol == "http1" or self.connecting == 0


class ConnectionPool:
    """Pools upstream connections per `Origin`; `request` is the one entry point."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = Timeouts(),
        limits: PoolLimits = PoolLimits(),
        h2_connection_factory: ConnectionFactory | None = None,
        ssl_context_factory: Callable[[tuple[str, ...]], ssl.SSLContext] | None = None,
        origin_timeouts: Mapping[Origin, Timeouts] | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        # `ssl_context` is used for every https origin when given (its ALPN offer then decides:
        # an "http1" origin whose peer picks h2 fails). `ssl_context_factory(alpn)` instead builds
        # one context per ALPN offer, e.g. `lambda alpn: make_client_ssl_context(ca, True, alpn)`.
        self._ssl_context = ssl_context
        self._ssl_context_factory = ssl_context_factory or (lambda alpn: make_client_ssl_context(alpn=alpn))
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._timeouts = timeouts
        # Per-origin overrides (a route's own connect/first-byte/read timeouts); the wait for a
        # pool slot stays global.
        self._origin_timeouts = dict(origin_timeouts or {})
        self._limits = limits
        if h2_connection_factory is None:
            from sigv4proxy.upstream.http2 import H2Connection  # the h2 library: only when used

            h2_connection_factory = H2Connection
        self._h2_factory: ConnectionFactory = h2_connection_factory
        self._pools: dict[Origin, _OriginPool] = {}
        self._closed = False
        self._on_retry = on_retry or (lambda reason: None)  # counts each retry by its reason

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: Body = None,
        interim: Interim | None = None,
        expect_continue: bool = False,
    ) -> Response:
        """The upstream's response head (the body streams from it). `interim` receives 1xx
        responses; `expect_continue` holds a streamed body for the upstream's 100 (the request
        carries `expect: 100-continue`)."""
        if self._closed:
            raise UpstreamConnectError("connection pool is closed")
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _OriginPool(origin)
        tracked: StreamedBody | None = None  # a streamed body: retried only while nothing was pulled
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            tracked = body = body if isinstance(body, StreamedBody) else IteratedBody(body)
        retries = refusals = 0
        fresh = unanswered_retried = False
        while True:
            # The common case inline (a free slot, nobody queued first): no coroutine to acquire
            conn = None if fresh or pool.waiters or pool.woken else pool.pick()
            if conn is None:
                conn = await self._acquire(pool, fresh)
            try:
                return await conn.handle_request(method, target, authority, headers, body, interim, expect_continue)
            except ConnectionNotAvailable:
                refusals += 1
                if refusals > _MAX_NOT_AVAILABLE:
                    raise Overloaded("no upstream connection could take the request") from None
            except RetryableStreamError as err:  # never processed: safe for any method
                if retries >= self._limits.max_retries or (tracked is not None and tracked.pulled):
                    raise
                retries += 1
                self._on_retry(err.retry_reason)
            except UnansweredReset:  # maybe processed: once, on a new connection, if idempotent
                if unanswered_retried or method not in IDEMPOTENT_METHODS or (tracked is not None and tracked.pulled):
                    raise
                unanswered_retried = fresh = True
                self._on_retry("unanswered")

    def stats(self) -> PoolStats:
        counts = {(p, s): 0 for p in ("h2", "http1") for s in ("active", "idle")}
        streams = waiting = 0
        for pool in self._pools.values():
            waiting += len(pool.waiters)
            for conn in pool.connections:
                if conn.is_closed():
                    continue
                protocol = "h2" if conn.http_version == "HTTP/2" else "http1"
                active = conn.active_streams()
                counts[(protocol, "active" if active else "idle")] += 1
                streams += active
        return PoolStats(counts, streams, waiting)

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            self._fail_waiters(pool, UpstreamConnectError("connection pool is closed"))
            if pool.expiry is not None:
                pool.expiry.cancel()
                pool.expiry = None
            for conn in list(pool.connections):
                await conn.aclose()
            pool.connections.clear()
            pool.ready.clear()
        self._pools.clear()

    # --- acquiring a slot ---
    async def _acquire(self, pool: _OriginPool, fresh: bool = False) -> Connection:
        if fresh and pool.can_open(self._limits.max_connections_per_origin):
            opened = await self._open(pool)  # a retry after a reused connection failed under it
            if opened.is_available():
                return opened
        if not (pool.waiters or pool.woken):  # the common case: a free slot, nobody queued first
            conn = pool.pick()
            if conn is not None:
                return conn
        # Only now the loop: get_running_loop() costs a getpid() system call in Python 3.11.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeouts.pool
        woken = False
        unusable = 0
        while True:
            if woken or not (pool.waiters or pool.woken):  # never jump the queue
                conn = pool.pick()
                if conn is not None:
                    if pool.waiters:  # after we claimed our slot, see whether more are free
                        loop.call_soon(self._wake_if_capacity, pool)
                    return conn
                if pool.can_open(self._limits.max_connections_per_origin):
                    conn = await self._open(pool)
                    if conn.is_available():
                        if pool.waiters:  # an h2 connection may have room for them too
                            loop.call_soon(self._wake_if_capacity, pool)
                        return conn
                    unusable += 1
                    if unusable >= _MAX_UNUSABLE_OPENS:
                        raise UpstreamConnectError("new upstream connections take no requests")
                    continue
            waiter = loop.create_future()
            entry = (waiter, deadline)
            if woken:
                pool.waiters.appendleft(entry)  # keep our place at the head
            else:
                pool.waiters.append(entry)
            if pool.expiry is None:
                pool.expiry = loop.call_at(deadline, self._expire_waiters, pool)
            try:
                woken = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None and waiter.result():
                    pool.woken -= 1
                    self._wake_if_capacity(pool)  # pass on the wake-up we will not use
                raise
            finally:
                if not waiter.done() or waiter.cancelled():
                    try:  # still queued: not woken, expired or failed by _fail_waiters
                        pool.waiters.remove(entry)
                    except ValueError:
                        pass
            if not woken:
                raise Overloaded("no upstream connection slot free in time")
            pool.woken -= 1

    async def _open(self, pool: _OriginPool) -> Connection:
        origin = pool.origin
        timeouts = self._origin_timeouts.get(origin, self._timeouts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.connect
        pool.connecting += 1
        conn: Connection | None = None
        try:
            context = self._context_for(origin) if origin.scheme == "https" else None
            opened = await open_transport(origin, context, timeouts.connect)
            try:
                protocol = choose_protocol(origin, opened.alpn)
            except ProxyError:
                opened.transport.abort()
                raise
            factory = self._h2_factory if protocol == "h2" else HTTP1Connection
            conn = factory(origin, timeouts, partial(self._on_change, pool))
            opened.attach(conn)  # type: ignore[arg-type]
            await conn.wait_ready(max(0.0, deadline - loop.time()))
            # listed only now, so the request that opened it gets the first slot (FIFO)
            pool.connections[conn] = None
            pool.ready[conn] = None
            pool.protocol = protocol
            return conn
        except BaseException as exc:
            if conn is not None:
                await conn.aclose()
                pool.forget(conn)
            pool.connecting -= 1
            conn = None
            if isinstance(exc, ProxyError) and not pool.connections and not pool.connecting:
                self._fail_waiters(pool, exc)  # nothing could serve them: fail fast, same reason
            raise
        finally:
            if conn is not None:
                pool.connecting -= 1
            self._wake_if_capacity(pool)

    def _context_for(self, origin: Origin) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        context = self._contexts.get(origin.alpn)
        if context is None:
            context = self._contexts[origin.alpn] = self._ssl_context_factory(origin.alpn)
        return context

    # --- wake-ups (synchronous) ---
    def _on_change(self, pool: _OriginPool, conn: Connection) -> None:
        pool.changed(conn)
        self._wake_if_capacity(pool)

    def _wake_if_capacity(self, pool: _OriginPool) -> None:
        """Wakes queued requests in order, no more than there are free slots not yet promised."""
        if not pool.waiters:
            return
        free = pool.free_slots(self._limits.max_connections_per_origin)
        while pool.waiters and pool.woken < free:
            waiter, _ = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                pool.woken += 1

    @staticmethod
    def _expire_waiters(pool: _OriginPool) -> None:
        """The queue's one timer: ends the waits past their deadline (with False) and re-arms for
        the earliest left. Per queued request that is no timer made and cancelled."""
        pool.expiry = None
        if not pool.waiters:
            return  # armed again by the next request that queues
        loop = asyncio.get_running_loop()
        now = loop.time()
        kept: deque[tuple[asyncio.Future[bool], float]] = deque()
        for waiter, deadline in pool.waiters:
            if waiter.done():
                continue
            if deadline <= now:
                waiter.set_result(False)
            else:
                kept.append((waiter, deadline))
        pool.waiters = kept
        if kept:
            earliest = min(deadline for _, deadline in kept)
            pool.expiry = loop.call_at(earliest, ConnectionPool._expire_waiters, pool)

    @staticmethod
    def _fail_waiters(pool: _OriginPool, err: ProxyError) -> None:
        while pool.waiters:
            waiter, _ = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(type(err)(err.reason))
