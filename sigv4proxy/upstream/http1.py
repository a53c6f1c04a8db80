"""HTTP/1.1 keep-alive client connection: one request at a time, the protocol of its own socket.

Owns: writing the request (head bytes joined once, one write; body after, chunked when its length
is unknown), feeding the socket's bytes to the sans-IO response parser (`http1_parse`), read
backpressure, and deciding when a socket may be reused. Must never: change a header it was given,
reuse a socket whose response was not fully read, let a truncated body end as if it were complete,
or log header values.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable

from sigv4proxy.errors import (
    BadRequest,
    ProxyError,
    UnansweredReset,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sigv4proxy.io.splice import cleartext_fd
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.base import (
    Body,
    ConnectionNotAvailable,
    EventWait,
    Headers,
    Interim,
    OnChange,
    Response,
    hold_for_continue,
    request_trailers,
    wake,
)
from sigv4proxy.upstream.body import SocketBody
from sigv4proxy.upstream.connection_core import CLOSED, READY, RETIRING, ConnectionCore
from sigv4proxy.wire.http1_parse import Fields, ResponseParser

READ_HIGH_WATER = 256 * 1024  # buffered body bytes before we stop reading the socket
READ_LOW_WATER = 64 * 1024
_JOIN_BODY_LIMIT = 64 * 1024  # a bytes body this small goes out in the same write as the head

_BAD_LINE = "request line contains CR, LF, NUL or a space"
_BAD_FIELD = "request line or header contains CR, LF or NUL, or a bad name"
# Header names already checked, with what framing they declare; bounded (names come from clients).
_PLAIN, _CONTENT_LENGTH, _TRANSFER_ENCODING, _TE, _TRAILER = 0, 1, 2, 3, 4
_FIELD_KINDS: dict[bytes, int] = {}
_FIELD_KINDS_LIMIT = 4096


def _field_kind(name: bytes) -> int:
    """Checks a header name seen for the first time; remembers it while the cache has room."""
    if not name or b":" in name or b"\r" in name or b"\n" in name or b"\x00" in name or b" " in name or b"\t" in name:
        raise BadRequest(_BAD_FIELD)
    lowered = name.lower()
    kind = (
        _CONTENT_LENGTH
        if lowered == b"content-length"
        else _TRANSFER_ENCODING
        if lowered == b"transfer-encoding"
        else _TE
        if lowered == b"te"
        else _TRAILER
        if lowered == b"trailer"
        else _PLAIN
    )
    if len(_FIELD_KINDS) < _FIELD_KINDS_LIMIT:
        _FIELD_KINDS[bytes(name)] = kind
    return kind


class _Exchange(EventWait):
    """One request/response on the socket; also the `ResponseBody` the Response reads from."""

    __slots__ = (
        "is_head",
        "status",
        "reason",
        "headers",
        "trailers",
        "chunks",
        "buffered",
        "remote_ended",
        "error",
        "request_sent",
        "sent_at",
        "send_task",
        "interim",
        "continue_waiter",
        "received",
    )

    def __init__(self, conn: HTTP1Connection, is_head: bool, interim: Interim | None) -> None:
        self.conn = conn
        self.is_head = is_head
        self.interim = interim  # where 1xx responses go
        self.continue_waiter: asyncio.Future[bool] | None = None  # an upload held for Expect
        self.received = False  # a byte of the answer arrived (a loss before that may be retried)
        self.status: int | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.remote_ended = False
        self.error: ProxyError | None = None
        self.request_sent = False
        self.sent_at = 0.0
        self.send_task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[bool] | None = None

    @property
    def complete(self) -> bool:
        return self.remote_ended and not self.chunks and self.error is None

    @property
    def ready(self) -> bool:
        return bool(self.chunks) or self.remote_ended or self.error is not None

    def fail(self, err: ProxyError) -> None:
        if self.error is None and not self.remote_ended:
            self.error = err
        self.wake()
        wake(self.continue_waiter)

    def take(self) -> bytes | None:
        if self.chunks:
            data = self.chunks.popleft()
            self.buffered -= len(data)
            if self.buffered <= READ_LOW_WATER:
                self.conn.resume_reading()
            return data
        if self.error is not None:
            raise self.error
        if self.remote_ended:
            return b""
        return None

    async def read(self) -> bytes:
        while True:
            data = self.take()
            if data is not None:
                return data
            if not await self.wait_event(self.conn.timeouts.read):
                self.fail(UpstreamTimeout("upstream response body stalled"))
                self.conn.abort()

    def close(self) -> None:
        if self.send_task is not None and not self.send_task.done():
            self.send_task.cancel()
        if not self.remote_ended or not self.request_sent:
            self.fail(UpstreamReset("response closed before it was read"))
            self.conn.abort()
        self.chunks.clear()
        self.buffered = 0


class HTTP1Connection(ConnectionCore):
    """A keep-alive HTTP/1.1 client connection; create via the pool's factory call. The protocol
    of its transport by its methods, without asyncio.Protocol as a base: compiled, that Python base
    would keep it from being a native class."""

    http_version = "HTTP/1.1"

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: OnChange) -> None:
        super().__init__(origin, timeouts, on_change)
        self._exchange: _Exchange | None = None
        # One lazy timer bounds the wait for response heads (see _arm_head_deadline).
        self._head_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._served = 0  # answers completed on this socket (it is a reused one when > 0)
        self._splice_fd = -1
        self._parser = ResponseParser(self._on_head, self._deliver, self._finish, self._on_interim)

    # --- the Connection interface ---
    def is_available(self) -> bool:
        return self.state is READY and self._exchange is None

    def capacity(self) -> int:
        return 1 if self.is_available() else 0

    def is_idle(self) -> bool:
        return self.is_available()

    def active_streams(self) -> int:
        return 0 if self._exchange is None else 1

    async def wait_ready(self, timeout: float) -> None:
        return None

    async def handle_request(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        body: Body,
        interim: Interim | None = None,
        expect_continue: bool = False,
    ) -> Response:
        if not self.is_available():
            raise ConnectionNotAvailable("connection is busy or closed")
        if not method or not target or method.find(b" ") >= 0 or target.find(b" ") >= 0 or authority.find(b" ") >= 0:
            raise BadRequest(_BAD_LINE)
        lines = [method, b" ", target, b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
        has_length = chunked = te = announced = False
        length_at = 0
        kinds = _FIELD_KINDS
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                kind = _field_kind(name)
            if kind:
                if kind == _CONTENT_LENGTH:
                    has_length = True
                    length_at = len(lines)
                elif kind == _TE:
                    te = True
                elif kind == _TRAILER:
                    announced = True
                else:
                    chunked = True  # the caller asked for chunked framing; we do the encoding
            lines += (name, b": ", value, b"\r\n")
        line_ends = len(headers) + 3  # request line, Host, the fields, the blank line
        is_bytes = isinstance(body, (bytes, bytearray, memoryview))
        if announced and has_length and body is not None and not is_bytes:
            # A streamed body with announced trailers (from HTTP/2): only chunked coding has room
            # for them after the body, so the declared length gives way.
            del lines[length_at : length_at + 4]
            line_ends -= 1
            has_length = False
        if te:  # TE is hop-by-hop: its sender names it in Connection (RFC 9110 §10.1.4)
            lines.append(b"Connection: TE\r\n")
            line_ends += 1
        if is_bytes and body and not has_length and not chunked:
            lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")  # type: ignore[arg-type]
            line_ends += 1
        elif body is not None and not is_bytes and not has_length and not chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
            line_ends += 1
            chunked = True
        lines.append(b"\r\n")
        head = b"".join(lines)
        # One pass over the joined head instead of three per field: every CR and LF in it must be
        # one of the CRLFs we wrote, and any other one (bare, paired or next to ours) splits off
        # a line of its own. splitlines, not count: bytes.count walks byte by byte, 2.1 against
        # 0.6 µs for both counts on a head with a role's 700-byte session token.
        if len(head.splitlines()) != line_ends or head.find(b"\x00") >= 0:
            raise BadRequest(_BAD_FIELD)
        exchange = self._exchange = _Exchange(self, method == b"HEAD", interim)
        self._parser.start(method == b"HEAD")
        transport = self._transport
        assert transport is not None
        if body is None or (is_bytes and len(body) <= _JOIN_BODY_LIMIT and not chunked):  # type: ignore[arg-type]
            if body:
                transport.writelines((head, body))  # type: ignore[arg-type]  # one send
            else:
                transport.write(head)
            exchange.request_sent = True
            exchange.sent_at = self.loop.time()
            self._arm_head_deadline()
        else:
            transport.write(head)
            exchange.send_task = self.loop.create_task(
                self._send_body(exchange, body, chunked, expect_continue and not is_bytes)
            )
        try:
            # Unbounded here: while uploading, the send task bounds every network wait; once
            # the request is sent, the connection's head deadline does. Inline, not a helper
            # coroutine: each level of coroutines is walked again at every wake-up.
            while exchange.status is None:
                if exchange.error is not None:
                    raise exchange.error
                exchange.waiter = waiter = self.loop.create_future()
                try:
                    await waiter
                finally:
                    exchange.waiter = None
        except BaseException:
            exchange.close()
            raise
        return Response(
            exchange.status,  # set: the head arrived
            exchange.headers,
            self.http_version,
            exchange,
            exchange.reason,
        )

    async def aclose(self) -> None:
        self.abort()

    # --- request side ---
    def _arm_head_deadline(self) -> None:
        """The first-byte timeout, lazily: requests on one socket are sequential, so a timer
        pending from an earlier request fires no later than this one's deadline and re-arms.
        Per request that is no timer made and cancelled."""
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.timeouts.first_byte, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        exchange = self._exchange
        if self.state is CLOSED or exchange is None or exchange.status is not None or not exchange.request_sent:
            return  # nothing awaited: armed again when the next request is sent
        self._head_timer = self._timer_until(exchange.sent_at + self.timeouts.first_byte, self._check_head)
        if self._head_timer is not None:
            return
        exchange.fail(UpstreamTimeout("no upstream response in time"))
        self.abort()

    async def _send_body(
        self, exchange: _Exchange, body: bytes | AsyncIterable[bytes], chunked: bool, expect_continue: bool
    ) -> None:
        transport = self._transport
        assert transport is not None
        try:
            if expect_continue and not await hold_for_continue(exchange, self.loop, self.timeouts.expect_continue):
                return  # answered on the head alone: the body is not sent, the socket not reused
            if isinstance(body, (bytes, bytearray, memoryview)):
                if chunked:
                    transport.writelines([b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"])
                else:
                    transport.write(body)
                await self._flow.drain(self.timeouts.read)
            else:
                try:
                    if chunked or not await self._send_off_socket(body):
                        async for chunk in body:
                            if not chunk:
                                continue
                            if chunked:
                                transport.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
                                await self._flow.drain(self.timeouts.read)
                            else:
                                await self._write_chunk(chunk)
                except ProxyError:
                    raise
                except Exception:
                    raise BadRequest("request body could not be read") from None
                if chunked:  # the last chunk, with the body's trailer fields (gRPC-style) if any
                    trailers = request_trailers(body)
                    transport.write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")
            exchange.request_sent = True
            exchange.sent_at = self.loop.time()
            self._arm_head_deadline()
            if exchange.remote_ended:  # the response finished first: the socket is not reusable
                self.abort()
            exchange.wake()
        except ProxyError as err:
            exchange.fail(err)
            self.abort()

    async def _send_off_socket(self, body: AsyncIterable[bytes]) -> bool:
        """A body that can be taken straight off the client's socket is (a `SocketBody`), once
        this socket has nothing of ours unsent: moved in the kernel into a cleartext socket, read
        into the process for TLS. False: iterate it."""
        transport = self._transport
        if not isinstance(body, SocketBody) or transport is None or transport.get_write_buffer_size():
            return False
        if self._splice_fd >= 0:
            return await body.splice_into(self._splice_fd, self.timeouts.read)
        taken = body.reads()
        if taken is None:
            return False
        await taken.send(self._write_chunk)
        return True

    async def _write_chunk(self, chunk: bytes) -> None:
        self._transport.write(chunk)  # type: ignore[union-attr]  # open while an exchange runs
        await self._flow.drain(self.timeouts.read)

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._splice_fd = cleartext_fd(transport)  # a request body may be spliced into it
        self._enter(READY)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None or self._parser.done:
            self._fail_connection(UpstreamProtocolError("upstream sent bytes without a request"))
            return
        exchange.received = True
        try:
            self._parser.feed(data)
        except ProxyError as err:
            self._fail_connection(err)

    def eof_received(self) -> bool | None:
        if self._exchange is not None:
            self._parser.feed_eof()  # ends a close-delimited body
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self._exchange
        if exchange is not None and not exchange.remote_ended:
            self._parser.feed_eof()
        if exchange is not None and not exchange.received and self._served:
            # the classic keep-alive race: the upstream's idle close crossed our request
            self._fail_connection(UnansweredReset("upstream closed a reused connection before answering"))
        else:
            self._fail_connection(UpstreamReset("upstream connection lost"))

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and self.state is not CLOSED:
            self._reading_paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        """Close without ceremony: used when the socket's state is no longer trustworthy."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._fail_connection(UpstreamReset("upstream connection closed"))

    # --- parser callbacks ---
    def _on_interim(self, status: int, headers: Fields) -> None:
        exchange: _Exchange = self._exchange  # type: ignore[assignment]
        if status == 100 and exchange.continue_waiter is not None:
            wake(exchange.continue_waiter)  # the upstream wants the body
        if exchange.interim is not None:
            exchange.interim(status, headers)

    def _on_head(self, status: int, reason: bytes, headers: Fields) -> None:
        exchange: _Exchange = self._exchange  # type: ignore[assignment]
        exchange.status, exchange.reason, exchange.headers = status, reason, headers
        exchange.wake()
        if exchange.continue_waiter is not None:  # answered on the head alone: the body is not wanted
            wake(exchange.continue_waiter)

    def _deliver(self, data: bytes) -> None:
        exchange: _Exchange = self._exchange  # type: ignore[assignment]
        if not data:
            return
        exchange.chunks.append(data)
        exchange.buffered += len(data)
        if exchange.buffered > READ_HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        exchange.wake()

    def _finish(self, trailers: Fields) -> None:
        exchange: _Exchange = self._exchange  # type: ignore[assignment]
        if trailers:
            exchange.trailers = trailers
        exchange.remote_ended = True
        exchange.wake()
        leftover = self._parser.has_leftover
        if leftover or not self._parser.keep_alive or not exchange.request_sent or self.state is RETIRING:
            self.abort() if leftover else self._close_quietly()
            return
        self._exchange = None
        self._served += 1
        self.resume_reading()
        self._arm_idle_timer()
        self._on_change(self)

    # --- plumbing ---
    def _idle_expired(self) -> None:
        self._close_quietly()

    def _retire_when_done(self) -> None:
        if self._exchange is None:
            self._close_quietly()

    def _close_quietly(self) -> None:
        self._close_transport()
        self._fail_connection(UpstreamReset("upstream connection closed"))

    def _fail_connection(self, err: ProxyError) -> None:
        if self._exchange is not None:
            self._exchange.fail(err)
        if not self._enter(CLOSED):
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._stop_idle_timer()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._flow.fail(err)
        self._on_change(self)
