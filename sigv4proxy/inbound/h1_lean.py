"""The lean HTTP/1.1 inbound protocol: an asyncio.Protocol of our own driving llhttp (httptools)
directly, each request through the exchange. The default (--h1-implementation=lean); the aiohttp
adapter (`inbound.h1`) is the reference it passes the same tests as.

Owns: the connection's parse (request line, fields and trailers with their size limits, answered
400 or 431 in our own words), the order of answers on a connection (pipelined requests queued,
answered one at a time), keep-alive and its idle limit, the deadline for a new connection's first
request head (slowloris), the client's half-close (what arrived whole is answered, then close),
the request body as the upstream's body kinds (small declared bodies whole, larger ones off the
socket with `h1_splice`, the rest streamed with their trailers and the client-silence bound), the
socket read only when the body's next chunk is wanted (held reads), a body left unread read and
dropped for a bounded time, and the graceful shutdown of its connections (`LeanH1Server`). The
answer is written by `h1_response`. Must never: let a request's body be parsed as the next request
(an upgrade offer with a body, CONNECT and any parse error end the connection), answer out of
order, forward a request the parser refused, or put a request byte in an error answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools

from sigv4proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotSupported,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
)
from sigv4proxy.exchange.exchange import Body, Exchange, StreamedBody, error_parts
from sigv4proxy.exchange.prepare import split_target
from sigv4proxy.fields import NOT_ADDABLE
from sigv4proxy.inbound.h1_answer import Answer
from sigv4proxy.inbound.h1_response import ResponseWriter
from sigv4proxy.inbound.h1_splice import SpliceableBody
from sigv4proxy.inbound.settings import InboundSettings
from sigv4proxy.io.splice import AVAILABLE as splice_available
from sigv4proxy.io.splice import CLIENT_STALLED, SHORT_BODY
from sigv4proxy.limits import MAX_HEADER_FIELD, MAX_HEADERS, MAX_REQUEST_LINE, SMALL_BODY

log = logging.getLogger("sigv4proxy.inbound.h1_lean")

KEEPALIVE_TIMEOUT = 75.0  # an idle kept connection closes after this (s), as aiohttp's server did
LINGERING_TIME = 10.0  # a body left unread is read and dropped this long at most, then close
_QUEUE_LIMIT = 16  # pipelined requests parsed ahead of their answer before reads pause
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
# Trailer fields never passed on: framing, routing, hop-by-hop and signing fields have no place
# after a body (RFC 9110 §6.5.1), and the proxy is the only signer.
_DROP_TRAILER = frozenset(n.encode("ascii") for n in NOT_ADDABLE)
_METHODS: dict[bytes, str] = {}


class _Refused(Exception):
    """Raised in a parser callback to stop the parse; the refusal is the connection's `_refusal`."""


class LeanH1Server:
    """The protocol factory for HTTP/1.1 connections (one per worker) and their shutdown."""

    def __init__(
        self,
        exchange: Exchange,
        settings: InboundSettings,
        clock: Callable[[], float],
        head_timeout: float | None = None,
    ) -> None:
        self.exchange = exchange
        self.settings = settings
        self.splice = settings.splice and splice_available  # large declared bodies may skip the process
        self.writer = ResponseWriter(clock, settings.read_timeout)
        self.head_timeout = head_timeout
        self.connections: set[LeanH1Connection] = set()
        self.closing = False
        # Original destination per inbound connection (transparent mode), read once.
        self.transparent = settings.transparent

    def __call__(self) -> LeanH1Connection:
        return LeanH1Connection(self)

    def pre_shutdown(self) -> None:
        """Idle connections close now; busy ones after the answer in progress."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, timeout: float) -> None:
        """Waits up to `timeout` for the connections to end, then cuts the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()


class LeanH1Connection(asyncio.Protocol):
    """One inbound HTTP/1.1 connection: llhttp's callbacks build requests, answered in order."""

    def __init__(self, server: LeanH1Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: LeanRequest | None = None  # the message the parser is in
        self._queue: deque[LeanRequest] = deque()  # parsed heads waiting for their turn
        self.active: LeanRequest | None = None  # the request being answered
        self._task: asyncio.Task | None = None  # the connection's turns, one request after another
        self._waiter: asyncio.Future[LeanRequest] | None = None  # `_task` waits here for a request
        self._next_turn: LeanRequest | None = None  # started from inside `_task`: its next turn
        self._heads = 0  # complete request heads so far (the first one has a deadline)
        self._line = 0  # bytes of the head line the parser is in (bounded before it ends)
        self._refusal: ProxyError | None = None  # why a parser callback stopped the parse
        self._broken = False  # the parse failed: nothing more is read
        self._closing = False  # no more requests: close once the answer in progress is out
        self._eof = False  # the client half-closed
        self._detached = False  # a body is being taken off the socket (h1_splice)
        self._reading = True
        self.writing_paused = False
        self._drain: asyncio.Future | None = None
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self.original_dst: tuple[str, int] | None | bool = False  # False: not read yet
        self._peername: object = None

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.head_timeout:
            self._loop.call_later(self.server.head_timeout, self._head_deadline)
        if self.server.closing:
            self.close_when_idle()

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # An h2c offer without a body, declined by answering it in HTTP/1.1: what follows its
            # head is the next request (an offer with a body, or CONNECT, never gets here).
            rest = data[upgrade.args[0] :]
            if rest:
                self.data_received(rest)
                return
        except httptools.HttpParserError:
            self._fail(self._refusal or BadRequest("malformed HTTP request"))
            return
        parsing = self._parsing
        if parsing is not None and not parsing.head_done:
            # A head line the parser holds unfinished (all after the last LF) is bounded here;
            # finished ones in the callbacks.
            end = data.rfind(b"\n")
            self._line = self._line + len(data) if end < 0 else len(data) - end - 1
            if self._line > MAX_REQUEST_LINE:
                self._fail(
                    HeadersTooLarge("request header field too large")
                    if parsing.headers
                    else BadRequest("request line too long")
                )
                return
        self._hold_reads()

    def eof_received(self) -> bool:
        """A client may half-close once its request is sent (RFC 9112 §9.6): answer what arrived
        whole, then close; a request cut short is not answered."""
        self._eof = True
        requests = list(self._queue)
        if self.active is not None:
            requests.append(self.active)
        if not requests:
            if self.transport is not None:
                self.transport.close()  # nothing to answer (what was written still goes out)
            return True
        if not all(r.body_done for r in requests):
            self.abort()  # a body cut short: its request is abandoned
            return True
        self._closing = True
        return True  # keep the transport open to write the answers

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._closing = self._broken = True
        for timer in (self._idle_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client connection closed"))
        for request in (self.active, self._parsing, *self._queue):
            if request is not None:
                request.lost()
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client went away: its request is abandoned, upstream stream too
        self.transport = None

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    def drain(self) -> Awaitable[None]:
        if self.transport is None:
            raise ConnectionResetError("the client connection closed")
        drain = self._drain
        if drain is None:
            drain = self._drain = self._loop.create_future()
        return drain

    # --- llhttp's callbacks (httptools) ---
    def on_message_begin(self) -> None:
        self._parsing = LeanRequest(self)

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.url = url if request.url is None else request.url + url
        if len(request.url) > MAX_REQUEST_LINE:
            self._refuse(BadRequest("request line too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        if len(name) + len(value) > MAX_HEADER_FIELD:
            self._refuse(HeadersTooLarge("request header field too large"))
        if request.head_done:  # after the last chunk: a trailer field
            request.trailers.append((name, value))
            if len(request.trailers) > MAX_HEADERS:
                self._refuse(HeadersTooLarge("too many request trailer fields"))
            return
        headers = request.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            self._refuse(HeadersTooLarge("too many request headers"))
        if len(name) == 14 and name.lower() == b"content-length":
            request.content_length = int(value)  # llhttp took only digits, once
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            request.chunked = True  # llhttp took only a coding list ending in chunked

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._heads += 1
        self._line = 0
        parser = self._parser
        method = parser.get_method()
        request.method = _METHODS.get(method) or _method(method)
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refuse(BadRequest("unsupported HTTP version"))
        request.version = version  # type: ignore[assignment]
        request.wants_keep_alive = parser.should_keep_alive()
        request.head_done = True
        request.has_body = request.chunked or bool(request.content_length)
        if request.method == "CONNECT":
            # What follows its head would be a tunnel: answer, then close.
            request.refuse(MethodNotSupported("CONNECT is not supported (VPC Lattice does not tunnel)"))
            self._stop_parsing()
        elif request.has_body and parser.should_upgrade():
            # llhttp skips the body of an upgrade offer: the connection cannot go on after it.
            request.refuse(BadRequest("protocol upgrade is not supported"))
            self._stop_parsing()
        request.prepare_target()
        if self.active is None and not self._queue:
            self._start(request)
        else:
            self._queue.append(request)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._parsing = None
        request.complete()

    def _refuse(self, error: ProxyError) -> None:
        self._refusal = error
        raise _Refused

    # --- reads ---
    def _hold_reads(self) -> None:
        """The socket is read only when the body's next chunk is wanted: a body chunk nobody
        asked for yet, or too many requests ahead of their answers, pause reading."""
        parsing = self._parsing
        if (parsing is not None and parsing.buffered and not parsing.waiting) or len(self._queue) >= _QUEUE_LIMIT:
            self._pause()

    def _pause(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def read_more(self) -> None:
        """A body's reader wants its next chunk (or a turn ended): read the socket again, unless
        the connection is done reading or a body is off the socket."""
        if (
            not self._reading
            and not self._broken
            and not self._detached
            and self.transport is not None
            and len(self._queue) < _QUEUE_LIMIT
        ):
            self._reading = True
            self.transport.resume_reading()

    def _stop_parsing(self) -> None:
        """Nothing after this message is read: answered in turn, then the connection closes."""
        self._broken = True
        self._closing = True
        self._pause()

    def _fail(self, error: ProxyError) -> None:
        """The parse failed: the request it was in (or a new one) is refused in its turn, after
        the answers before it, and the connection closes."""
        self._stop_parsing()
        request = self._parsing
        if request is not None and request.head_done:
            request.body_failed(error)  # its head is out: the body's reader fails with it
            return
        request = LeanRequest(self)
        request.refuse(error)
        request.malformed = True
        request.body_done = True
        if self.active is None and not self._queue:
            self._start(request)
        else:
            self._queue.append(request)

    # --- turns ---
    def _start(self, request: LeanRequest) -> None:
        self.active = request
        if request.malformed:  # the parser's refusal: counted, answered, no request to run
            self.server.exchange.refused(request.refusal)  # type: ignore[arg-type]
            try:
                request.answer_refusal()
            except ConnectionError:
                pass
            self._finish(request)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(request)  # the connection's task waits for its next turn
        elif self._task is None:
            self._task = self._loop.create_task(self._turns(request))
        else:
            self._next_turn = request  # called from the task as its turn ends: it runs this next

    async def _turns(self, request: LeanRequest) -> None:
        """The connection's task: one request's turn after another, waiting between them while
        the connection stays open. One task per connection rather than per request: a task's
        creation, its registration and its end cost more than a future per request. One turn
        runs at a time; cancelled when the client goes away."""
        try:
            while True:
                try:
                    await self.server.exchange.run(request)
                except asyncio.CancelledError:
                    self._finish(request)  # the client went away: nothing more is written
                    raise
                except Exception:
                    log.error("request failed unexpectedly", exc_info=True)
                    self.abort()
                    return
                self._finish(request)
                turn, self._next_turn = self._next_turn, None
                if turn is None:
                    if self.transport is None or self.transport.is_closing():
                        return
                    self._waiter = self._loop.create_future()
                    turn = await self._waiter  # cancelled if the connection goes first
                request = turn
        finally:
            self._task = self._waiter = self._next_turn = None

    def _finish(self, request: LeanRequest) -> None:
        """The answer is out: the next request's turn, or the body left unread dropped first, or
        the connection closes."""
        request.answered = True
        transport = self.transport
        if transport is None:
            return
        if not request.keep_alive or (self._closing and not self._queue):
            transport.close()  # after what was written
            return
        if not request.body_done:
            if self._detached:
                return  # the body is off the socket: h1_splice gives it back (or closes)
            request.discard()
            self._linger_timer = self._loop.call_later(LINGERING_TIME, self._linger_expired, request)
            self.read_more()
            return
        self._next()

    def _next(self) -> None:
        self.active = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._queue:
            self._start(self._queue.popleft())
            self.read_more()
            return
        if self._closing:
            if self.transport is not None:
                self.transport.close()
            return
        self.read_more()
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(KEEPALIVE_TIMEOUT, self._idle_check)

    def body_ended(self, request: LeanRequest) -> None:
        """A body left unread has now been read to its end: the connection goes on."""
        if request is self.active and request.discarding:
            self._next()

    def _linger_expired(self, request: LeanRequest) -> None:
        self._linger_timer = None
        if request is self.active and not request.body_done:
            self.abort()

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.transport is None:
            return
        idle = self.active is None and self._parsing is None and not self._queue
        remaining = self._idle_since + KEEPALIVE_TIMEOUT - self._loop.time()
        if idle and remaining <= 0:
            self.transport.close()
        else:
            self._idle_timer = self._loop.call_later(max(remaining, 1.0), self._idle_check)

    def _head_deadline(self) -> None:
        if self.transport is not None and self._heads == 0:
            self.abort()  # not even one complete request head in time

    def close_when_idle(self) -> None:
        """Shutdown: close now when idle, else once the answer in progress is out."""
        self._closing = True
        if self.active is None and not self._queue and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- a body taken off the socket (h1_splice's BodySocket, through LeanRequest) ---
    def detach_body(self, request: LeanRequest) -> tuple[bytes, bool, int] | None:
        if self.transport is None or self.transport.is_closing() or request is not self.active:
            return None
        if request.body_done:
            return request.take(), False, request.received
        if request is not self._parsing or self._broken:
            return None
        prefix = request.take()
        self._pause()
        self._detached = True
        return prefix, True, request.received

    def reattach_body(self, request: LeanRequest, complete: bool) -> None:
        self._detached = False
        if not complete:
            self._stop_parsing()  # the socket sits mid-body: close after the answer
            if request.answered and self.transport is not None:
                self.transport.close()
            return
        # The parser still counts the body's bytes the kernel moved: a fresh one for what follows.
        self._parser = httptools.HttpRequestParser(self)
        self._parsing = None
        self._line = 0
        request.complete()
        if request.answered:  # the answer was out already: the next request's turn
            self._next()
        else:
            self.read_more()


class LeanRequest(Answer):
    """One request on a lean connection: its head and body as the parser gave them, as the
    exchange's `Inbound`, and its answer (`Answer`, written by `h1_response`)."""

    from_h2 = False
    protocol = "HTTP/1.1"
    refusal: ProxyError | None = None
    malformed = False  # the parser refused it: no request, only the answer
    url: bytes | None = None
    method = "GET"
    version = (1, 1)
    wants_keep_alive = False
    content_length: int | None = None
    chunked = False
    has_body = False
    head_done = False
    body_done = False
    received = 0  # body bytes parsed so far
    waiting = False  # a reader waits for the body's next bytes
    discarding = False  # left unread after the answer: read and dropped
    answered = False  # its answer is out (or it was cut)
    target = ""  # origin-form path?query
    authority: str | None = None  # of an absolute-form target
    _error: ProxyError | None = None  # the body broke (parse error, client gone, stalled)
    _waiter: asyncio.Future | None = None
    _continue_due = False

    def __init__(self, conn: LeanH1Connection) -> None:
        self._conn = conn
        self.headers: list[tuple[bytes, bytes]] = []
        self.raw_headers = self.headers
        self.trailers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self.buffered = 0

    # --- Answer: the client's connection ---
    @property
    def transport(self) -> asyncio.Transport | None:  # type: ignore[override]
        return self._conn.transport

    @property
    def client_keep_alive(self) -> bool:  # type: ignore[override]
        """The client's wish, unless the connection ends after this answer (shutdown, a parse
        failure or a half-close with nothing more to answer)."""
        conn = self._conn
        return self.wants_keep_alive and not conn.server.closing and not (conn._closing and not conn._queue)

    @property
    def writing_paused(self) -> bool:
        return self._conn.writing_paused

    def drain(self) -> Awaitable[None]:  # type: ignore[override]
        return self._conn.drain()

    @property
    def writer(self) -> ResponseWriter:
        return self._conn.server.writer

    # --- the body as the parser delivers it ---
    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.discarding:
            return
        self._chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def complete(self) -> None:
        self.body_done = True
        self._wake()
        if self.discarding:
            self._conn.body_ended(self)

    def body_failed(self, error: ProxyError) -> None:
        self._error = error
        self._wake()

    def lost(self) -> None:
        if not self.body_done and self._error is None:
            self.body_failed(BadRequest(SHORT_BODY))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.waiting = False  # from here the reads are held again (until it asks for more)
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self.buffered = 0
        return data

    def discard(self) -> None:
        self.discarding = True
        self._chunks = []
        self.buffered = 0

    async def _more(self) -> None:
        """Waits for more of the body, the socket read for it; 408 after --read-timeout of
        client silence (time spent waiting for the upstream does not count)."""
        self._raise_failure()
        conn = self._conn
        self._waiter = waiter = conn._loop.create_future()
        self.waiting = True
        conn.read_more()
        timer = conn._loop.call_later(conn.server.settings.read_timeout, self._stalled, waiter)
        try:
            await waiter
        finally:
            self.waiting = False
            timer.cancel()
        self._raise_failure()

    def _raise_failure(self) -> None:
        # A method, not the test inline twice: the compiled build (setup.py) would take the first
        # test as proof the attribute is still None after the await.
        if self._error is not None:
            raise self._error

    def _stalled(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            self.body_failed(RequestTimeout(CLIENT_STALLED))

    async def _rest_of_small_body(self, length: int) -> bytes:
        while not self.body_done:
            await self._more()
        data = self.take()
        if len(data) != length:
            raise BadRequest(SHORT_BODY)
        return data

    def _streamed(self) -> AsyncIterator[bytes]:
        return _StreamedChunks(self)

    # --- BodySocket (h1_splice) ---
    @property
    def lingering_time(self) -> float:
        return LINGERING_TIME

    def detach_body(self) -> tuple[bytes, bool, int] | None:
        return self._conn.detach_body(self)

    def reattach_body(self, complete: bool) -> None:
        self._conn.reattach_body(self, complete)

    # --- the exchange's Inbound ---
    def refuse(self, error: ProxyError) -> None:
        if self.refusal is None:
            self.refusal = error

    def prepare_target(self) -> None:
        raw = self.url.decode("latin-1") if self.url is not None else ""
        try:
            self.authority, self.target = split_target(raw)
        except ProxyError as exc:
            self.refuse(exc)
            self.target = raw

    def original_destination(self) -> tuple[str, int] | None:
        conn = self._conn
        if not conn.server.transparent:
            return None
        if conn.original_dst is False:
            from sigv4proxy.io.original_dst import original_destination

            transport = conn.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            conn.original_dst = original_destination(sock) if sock is not None else None
        return conn.original_dst  # type: ignore[return-value]

    def body(self, expect_continue: bool) -> Body | Awaitable[Body]:
        """A declared body up to SMALL_BODY read whole (usually all here already, then no await),
        a larger one taken off the socket where it can be, anything else streamed with its
        trailers. A client waiting for 100 (Continue) gets it when its body is first wanted."""
        self.expects = expect_continue
        length = self.content_length
        if length is not None and not self.chunked:
            if length <= SMALL_BODY and not expect_continue:
                if self.body_done and self._error is None:
                    data = self.take()
                    if len(data) == length:
                        return data
                    raise BadRequest(SHORT_BODY)
                return self._rest_of_small_body(length)
            if self._conn.server.splice:
                return SpliceableBody(
                    self._streamed(),
                    self,
                    length,
                    self._conn.server.settings.read_timeout,
                    self.send_continue if expect_continue else None,
                )
        return _LeanBody(self)

    async def answer_error(self, exc: ProxyError) -> None:
        self.status = exc.status
        # A client still waiting for 100 sends no body after this: the connection cannot go on.
        self.keep_alive = (
            self.client_keep_alive and not exc.closes_connection and not (self.expects and not self.continued)
        )
        headers, text = error_parts(exc)
        self._conn.server.writer.own_answer(self, exc.status, headers, text)

    def answer_refusal(self) -> None:
        """The answer to a request the parser refused; the connection closes after it."""
        error = self.refusal
        assert error is not None
        self.status = error.status
        self.keep_alive = False
        headers, text = error_parts(error)
        self._conn.server.writer.own_answer(self, error.status, headers, text)

    def own_cancellation(self) -> ProxyError | None:
        return None  # a request's task is cancelled only when its client went away

    def log_fields(self) -> tuple[str, str | None, object, str | None]:
        host = user_agent = None
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"host" and host is None:
                host = value.decode("latin-1")
            elif lname == b"user-agent" and user_agent is None:
                user_agent = value.decode("latin-1")
        conn = self._conn
        if conn._peername is None and conn.transport is not None:
            conn._peername = conn.transport.get_extra_info("peername")
        return (self.url.decode("latin-1") if self.url is not None else "", host, conn._peername, user_agent)


class _StreamedChunks:
    """The body's chunks as the client sends them, the socket read only when the next one is
    wanted; past --max-body-size 413. An iterator class, not an async generator, so the module
    compiles (setup.py); like a generator it ends for good once it ends or fails."""

    def __init__(self, request: LeanRequest) -> None:
        self._request = request
        self._limit = request._conn.server.settings.max_body_size
        self._seen = 0
        self._started = False
        self._over = False

    def __aiter__(self) -> _StreamedChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._over:
            raise StopAsyncIteration
        request = self._request
        if not self._started:
            self._started = True
            if request.expects:
                request.send_continue()
        try:
            while not request.buffered:
                if request.body_done:
                    raise StopAsyncIteration
                await request._more()
            chunk = request.take()
            if self._limit is not None:
                self._seen += len(chunk)
                if self._seen > self._limit:
                    raise PayloadTooLarge("request body exceeds --max-body-size")
            return chunk
        except BaseException:
            self._over = True
            raise


class _LeanBody(StreamedBody):
    """A streamed request body with its trailers (a chunked upload's, after the last chunk)."""

    def __init__(self, request: LeanRequest) -> None:
        super().__init__()
        self._request = request

    def chunks(self) -> AsyncIterator[bytes]:
        return self._request._streamed()

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return [(n, v) for n, v in self._request.trailers if n.lower() not in _DROP_TRAILER]


def _method(raw: bytes) -> str:
    method = raw.decode("ascii")
    if len(_METHODS) < 64:
        _METHODS[raw] = method
    return method
