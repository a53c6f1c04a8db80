"""HTTP/1.1 keep-alive client connection: one request at a time on its own asyncio.Protocol.

Owns: writing the request (head bytes joined once, one write; body after, chunked when its length
is unknown), a minimal response parser (status line + headers, Content-Length, chunked with
trailers, close-delimited, no body for HEAD/1xx/204/304), read backpressure, and deciding when a
socket may be reused. Must never: change a header it was given, reuse a socket whose response was
not fully read, let a truncated body end as if it were complete, or log header values.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, Callable

from sigv4proxy.errors import (
    BadRequest,
    ProxyError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sigv4proxy.upstream.base import (
    Body,
    ConnectionNotAvailable,
    Headers,
    Origin,
    Response,
    Timeouts,
    WriteFlow,
    check_request_fields,
)

MAX_HEAD = 64 * 1024  # status line + headers (and trailers)
MAX_CHUNK_LINE = 4096
READ_HIGH_WATER = 256 * 1024  # buffered body bytes before we stop reading the socket
READ_LOW_WATER = 64 * 1024
_JOIN_BODY_LIMIT = 64 * 1024  # a bytes body this small goes out in the same write as the head
_HEX_DIGITS = b"0123456789abcdefABCDEF"

# parser phases
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


def _parse_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise UpstreamProtocolError("upstream sent a malformed header line")
        if b"\n" in line or b"\r" in line or b"\x00" in line:
            raise UpstreamProtocolError("upstream sent a forbidden character in a header")
        fields.append((name, value.strip(b" \t")))
    return fields


class _Exchange:
    """One request/response on the socket; also the `ResponseBody` the Response reads from."""

    __slots__ = ("conn", "is_head", "status", "headers", "trailers", "chunks", "buffered",
                 "ended", "error", "request_sent", "sent_at", "send_task", "waiter")

    def __init__(self, conn: HTTP1Connection, is_head: bool) -> None:
        self.conn = conn
        self.is_head = is_head
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False
        self.error: ProxyError | None = None
        self.request_sent = False
        self.sent_at = 0.0
        self.send_task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> bool:
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            self.waiter = None

    def fail(self, err: ProxyError) -> None:
        if self.error is None and not self.ended:
            self.error = err
        self.wake()

    async def read(self) -> bytes:
        while True:
            if self.chunks:
                data = self.chunks.popleft()
                self.buffered -= len(data)
                if self.buffered <= READ_LOW_WATER:
                    self.conn.resume_reading()
                return data
            if self.error is not None:
                raise self.error
            if self.ended:
                return b""
            if not await self.wait(self.conn.timeouts.read):
                self.fail(UpstreamTimeout("upstream response body stalled"))
                self.conn.abort()

    async def aclose(self) -> None:
        if self.send_task is not None and not self.send_task.done():
            self.send_task.cancel()
        if not self.ended or not self.request_sent:
            self.fail(UpstreamReset("response closed before it was read"))
            self.conn.abort()
        self.chunks.clear()
        self.buffered = 0


class HTTP1Connection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection; create via the pool's factory call."""

    http_version = "HTTP/1.1"

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: Callable[[], None]) -> None:
        self.origin = origin
        self.timeouts = timeouts
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._flow = WriteFlow()
        self._exchange: _Exchange | None = None
        self._closed = False
        self._reading_paused = False
        self._buf = bytearray()
        self._phase = _DONE
        self._remaining = 0  # body bytes left (Content-Length or current chunk)
        self._keep_alive = False
        self._idle_since = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- the Connection interface ---
    def is_available(self) -> bool:
        return not self._closed and self._exchange is None and self._transport is not None

    def is_idle(self) -> bool:
        return self.is_available()

    def is_closed(self) -> bool:
        return self._closed

    def has_expired(self, now: float) -> bool:
        return self.is_idle() and now - self._idle_since > self.timeouts.idle

    def active_streams(self) -> int:
        return 0 if self._exchange is None else 1

    async def wait_ready(self, timeout: float) -> None:
        return None

    async def handle_request(self, method: bytes, target: bytes, authority: bytes,
                             headers: Headers, body: Body) -> Response:
        if not self.is_available():
            raise ConnectionNotAvailable("connection is busy or closed")
        check_request_fields(method, target, authority, headers)
        lines = [method, b" ", target, b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
        has_length = chunked = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                has_length = True
            elif lowered == b"transfer-encoding":
                chunked = True  # the caller asked for chunked framing; we do the encoding
            lines += (name, b": ", value, b"\r\n")
        is_bytes = isinstance(body, (bytes, bytearray, memoryview))
        if is_bytes and body and not has_length and not chunked:
            lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")  # type: ignore[arg-type]
        elif body is not None and not is_bytes and not has_length and not chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
            chunked = True
        lines.append(b"\r\n")
        exchange = self._exchange = _Exchange(self, method == b"HEAD")
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._phase, self._keep_alive = _HEAD, False
        transport = self._transport
        assert transport is not None
        if body is None or (is_bytes and len(body) <= _JOIN_BODY_LIMIT and not chunked):  # type: ignore[arg-type]
            if body:
                lines.append(bytes(body))  # type: ignore[arg-type]
            transport.write(b"".join(lines))
            exchange.request_sent = True
            exchange.sent_at = self._loop.time()
        else:
            transport.write(b"".join(lines))
            exchange.send_task = self._loop.create_task(self._send_body(exchange, body, chunked))
        try:
            await self._await_head(exchange)
        except BaseException:
            await exchange.aclose()
            raise
        return Response(exchange.status, exchange.headers, self.http_version, exchange)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        self.abort()

    # --- request side ---
    async def _await_head(self, exchange: _Exchange) -> None:
        while exchange.status is None:
            if exchange.error is not None:
                raise exchange.error
            timeout = None  # while uploading, the send task bounds every network wait
            if exchange.request_sent:
                timeout = exchange.sent_at + self.timeouts.first_byte - self._loop.time()
                if timeout <= 0:
                    exchange.fail(UpstreamTimeout("no upstream response in time"))
                    self.abort()
                    continue
            await exchange.wait(timeout)

    async def _send_body(self, exchange: _Exchange, body: bytes | AsyncIterable[bytes],
                         chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            if isinstance(body, (bytes, bytearray, memoryview)):
                if chunked:
                    transport.writelines([b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"])
                else:
                    transport.write(body)
                await self._flow.drain(self.timeouts.read)
            else:
                try:
                    async for chunk in body:
                        if not chunk:
                            continue
                        if chunked:
                            transport.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
                        else:
                            transport.write(chunk)
                        await self._flow.drain(self.timeouts.read)
                except ProxyError:
                    raise
                except Exception:
                    raise BadRequest("request body could not be read") from None
                if chunked:
                    transport.write(b"0\r\n\r\n")
            exchange.request_sent = True
            exchange.sent_at = self._loop.time()
            if exchange.ended:  # the response finished first: the socket is not reusable
                self.abort()
            exchange.wake()
        except ProxyError as err:
            exchange.fail(err)
            self.abort()

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None or self._phase == _DONE:
            self._fail_connection(UpstreamProtocolError("upstream sent bytes without a request"))
            return
        if not self._buf and self._phase in (_LENGTH, _UNTIL_CLOSE):
            self._body_fast_path(exchange, data)
            return
        self._buf += data
        try:
            self._parse(exchange)
        except ProxyError as err:
            self._fail_connection(err)

    def eof_received(self) -> bool | None:
        exchange = self._exchange
        if exchange is not None and self._phase == _UNTIL_CLOSE:
            self._finish(exchange)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self._exchange
        if exchange is not None and self._phase == _UNTIL_CLOSE and not exchange.ended:
            self._finish(exchange)
        self._fail_connection(UpstreamReset("upstream connection lost"))

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._closed:
            self._reading_paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        """Close without ceremony: used when the socket's state is no longer trustworthy."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._fail_connection(UpstreamReset("upstream connection closed"))

    # --- response parser ---
    def _body_fast_path(self, exchange: _Exchange, data: bytes) -> None:
        if self._phase == _LENGTH:
            if len(data) > self._remaining:
                self._buf += data  # bytes beyond the body: let the slow path judge them
                self._parse(exchange)
                return
            self._remaining -= len(data)
            self._deliver(exchange, data)
            if not self._remaining:
                self._finish(exchange)
        else:
            self._deliver(exchange, data)

    def _parse(self, exchange: _Exchange) -> None:
        buf = self._buf
        while buf:
            phase = self._phase
            if phase == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamProtocolError("upstream response head too large")
                    return
                head = bytes(buf[:end])
                del buf[:end + 4]
                self._on_head(exchange, head)
            elif phase == _LENGTH or phase == _CHUNK_DATA:
                take = min(self._remaining, len(buf))
                self._deliver(exchange, bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if not self._remaining:
                    if phase == _LENGTH:
                        self._finish(exchange)
                    else:
                        self._phase = _CHUNK_END
            elif phase == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise UpstreamProtocolError("upstream chunk size line too long")
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[:end + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise UpstreamProtocolError("upstream sent a bad chunk size") from None
                if not size_text or size_text.strip(_HEX_DIGITS):
                    raise UpstreamProtocolError("upstream sent a bad chunk size")
                self._remaining = size
                self._phase = _CHUNK_DATA if size else _TRAILERS
            elif phase == _CHUNK_END:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamProtocolError("upstream chunk not followed by CRLF")
                del buf[:2]
                self._phase = _CHUNK_SIZE
            elif phase == _TRAILERS:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    self._finish(exchange)
                    continue
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamProtocolError("upstream trailers too large")
                    return
                exchange.trailers = _parse_fields(bytes(buf[:end]).split(b"\r\n"))
                del buf[:end + 4]
                self._finish(exchange)
            elif phase == _UNTIL_CLOSE:
                self._deliver(exchange, bytes(buf))
                buf.clear()
            else:  # _DONE: bytes after a complete response (no pipelining here)
                raise UpstreamProtocolError("upstream sent bytes after the response")

    def _on_head(self, exchange: _Exchange, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        status_text = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not status_text.isdigit() or \
                (len(rest) > 3 and rest[3:4] != b" "):
            raise UpstreamProtocolError("upstream sent a malformed status line")
        status = int(status_text)
        fields = _parse_fields(lines)
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamProtocolError("upstream switched protocols unasked")
            return  # interim response: the final one follows
        length: int | None = None
        transfer_chunked = has_te = False
        close = version == b"HTTP/1.0"
        for name, value in fields:
            lowered = name.lower()
            if lowered == b"content-length":
                values = {v.strip() for v in value.split(b",")}
                if len(values) != 1 or not next(iter(values)).isdigit():
                    raise UpstreamProtocolError("upstream sent a bad Content-Length")
                new_length = int(values.pop())
                if length is not None and new_length != length:
                    raise UpstreamProtocolError("upstream sent conflicting Content-Length")
                length = new_length
            elif lowered == b"transfer-encoding":
                has_te = True
                transfer_chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif lowered == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    close = False
        exchange.status, exchange.headers = status, fields
        self._keep_alive = not close
        if exchange.is_head or status in (204, 304):
            self._finish(exchange)
        elif has_te:
            self._keep_alive = self._keep_alive and transfer_chunked and length is None
            self._phase = _CHUNK_SIZE if transfer_chunked else _UNTIL_CLOSE
        elif length is not None:
            self._remaining = length
            self._phase = _LENGTH
            if not length:
                self._finish(exchange)
        else:
            self._keep_alive = False
            self._phase = _UNTIL_CLOSE
        exchange.wake()

    def _deliver(self, exchange: _Exchange, data: bytes) -> None:
        if not data:
            return
        exchange.chunks.append(data)
        exchange.buffered += len(data)
        if exchange.buffered > READ_HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        exchange.wake()

    def _finish(self, exchange: _Exchange) -> None:
        exchange.ended = True
        self._phase = _DONE
        exchange.wake()
        if self._buf or not self._keep_alive or not exchange.request_sent:
            self.abort() if self._buf else self._close_quietly()
            return
        self._exchange = None
        self.resume_reading()
        self._arm_idle_timer()
        self._on_change()

    # --- plumbing ---
    def _arm_idle_timer(self) -> None:
        self._idle_since = self._loop.time()
        self._idle_timer = self._loop.call_later(self.timeouts.idle, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._exchange is None:
            self._close_quietly()

    def _close_quietly(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._fail_connection(UpstreamReset("upstream connection closed"))

    def _fail_connection(self, err: ProxyError) -> None:
        if self._exchange is not None:
            self._exchange.fail(err)
        if self._closed:
            return
        self._closed = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._flow.fail(err)
        self._on_change()
