"""Writing an upstream response back over the inbound HTTP/1.1 connection, bytes of our own.

Owns: the status line (the upstream's reason phrase kept) and header block (names, values, order
and repeats as the upstream sent them; hop-by-hop fields and Content-Length dropped), 1xx responses
forwarded ahead of the final one, the framing (Content-Length when the upstream declared one and
announced no trailers, chunked to an HTTP/1.1 client otherwise, with the upstream's trailers;
close-delimited to HTTP/1.0; no body after HEAD, 1xx, 204 or 304), Date when the upstream sent
none, the keep-alive decision handed back to the inbound adapter (`Answer.keep_alive`), the write
timing (every write carries what has arrived; nothing waits for more) and the transport's write
backpressure (a client that takes nothing of its answer for the send timeout, `--read-timeout`, is
cut, as nginx's send_timeout does: else it would hold its request and upstream stream for ever).
What it needs of the client's connection is an `h1_answer.Answer`, which each HTTP/1.1 adapter
(`h1` over aiohttp, `h1_lean`) provides. aiohttp's StreamResponse did the same at a much higher
cost per request (docs/performance.md). Compiled in the compiled build (setup.py). Must never:
write a header line holding CR or LF (response splitting), keep writing past the transport's
high-water mark without waiting, send a body where the message may have none, hold a received byte
back waiting for the next one, or end a broken body as if it were complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus

from sigv4proxy.errors import ProxyError, UpstreamProtocolError
from sigv4proxy.exchange.exchange import Response
from sigv4proxy.fields import DROP_RESPONSE
from sigv4proxy.inbound.h1_answer import Answer

_FORWARD, _DROP, _LENGTH, _DATE, _TRAILER = 0, 1, 2, 3, 4
_CACHE_LIMIT = 1024  # entries per cache: names and status lines come from upstreams
_EMPTY_BODY_STATUS = frozenset((204, 304, *range(100, 200)))
_NO_LENGTH_STATUS = frozenset((204, *range(100, 200)))  # RFC 9110 §8.6: no Content-Length at all
_COLON = b": "
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_SMALL_WRITE = 16 * 1024  # below this, parts are joined into one buffer; above, a vectored write
_COALESCE_LIMIT = 256 * 1024  # body bytes already here that one write may gather


class ResponseWriter:
    """One per worker: caches for header names, status lines and the Date of this second."""

    def __init__(self, clock: Callable[[], float], send_timeout: float = 60.0) -> None:
        self._clock = clock
        self._send_timeout = send_timeout  # the longest a client may take nothing of its answer
        self._names: dict[bytes, int] = {}  # raw name -> _FORWARD/_DROP/_LENGTH/_DATE (bounded)
        self._status_lines: dict[tuple[int, int, int, bytes | None], bytes] = {}

    async def relay(self, answered: Answer, upstream: Response) -> None:
        """Writes `upstream` to the client, counting body bytes in `answered`. Errors propagate
        (ConnectionError, ProxyError; UpstreamProtocolError for a bad header); `answered.started`
        says whether the client can still get an error answer instead of a cut connection.

        Each write carries what has arrived and nothing waits for more: the head leaves at once
        unless a body chunk is already here to share its write, and a chunk leaves as soon as the
        next one is not. A body the upstream breaks is cut after every byte it did send."""
        status = upstream.status
        version = answered.version
        # A client still waiting for 100 sends no body after this answer: the connection cannot
        # carry another request (RFC 9110 §10.1.1)
        keep_alive = answered.client_keep_alive and not (answered.expects and not answered.continued)
        head, length, announced = self._header_lines(upstream.headers)
        empty = status in _EMPTY_BODY_STATUS or answered.method == "HEAD"
        chunked = False
        if announced and length is not None and not empty and version >= (1, 1) and upstream.http_version == "HTTP/2":
            length = None  # HTTP/2 trailers after a declared length: only chunked can carry them
        if length is not None:
            if status not in _NO_LENGTH_STATUS:
                head.append(b"Content-Length: %d" % length)
        elif not empty:
            if version >= (1, 1):
                chunked = True
                head.append(b"Transfer-Encoding: chunked")
            else:
                keep_alive = False  # the end of the body is the end of the connection
        if keep_alive:
            if version == (1, 0):
                head.append(b"Connection: keep-alive")
        elif version == (1, 1):
            head.append(b"Connection: close")
        block = _CRLF.join(head)
        if block.count(b"\r") != len(head) - 1 or block.count(b"\n") != len(head) - 1:
            raise UpstreamProtocolError("upstream sent a header with CR or LF in it")
        answered.keep_alive = keep_alive
        pending = [self._status_line(version, status, upstream.reason), block, b"\r\n\r\n"]
        size = 0  # body bytes in `pending`
        if not upstream.body_ready:
            _write(answered, pending, size)
            if answered.writing_paused:
                await self._drained(answered)
            pending = []
        take = upstream.take
        try:
            while True:
                chunk = take()  # a chunk already here costs no coroutine
                if chunk is None:
                    chunk = await upstream.next_chunk()
                if not chunk:
                    break
                if empty:
                    continue  # nothing may follow this head; the upstream stream is still drained
                answered.body_bytes += len(chunk)
                size += len(chunk)
                if chunked:
                    pending += (b"%x\r\n" % len(chunk), chunk, _CRLF)
                else:
                    pending.append(chunk)
                if upstream.body_complete:
                    break  # the end leaves with the last chunk
                if upstream.body_ready and size < _COALESCE_LIMIT:
                    continue  # the next read will not wait: share one write with it
                _write(answered, pending, size)
                if answered.writing_paused:  # a client that pipelines and never reads gets no more
                    await self._drained(answered)
                pending = []
                size = 0
        except ProxyError:
            if pending:  # what arrived before the break (the head at least) still goes out
                _write(answered, pending, size)
            raise
        if chunked:
            pending.append(self._last_chunk(upstream.trailers))
        if pending:
            _write(answered, pending, size)
            if answered.writing_paused:
                await self._drained(answered)

    async def _drained(self, answered: Answer) -> None:
        """Until the client took enough of what was written (the transport below its low-water
        mark). One that takes nothing for the send timeout has its connection aborted: the
        exchange sees a client gone, and resets the upstream stream."""
        try:
            await asyncio.wait_for(answered.drain(), self._send_timeout)
        except TimeoutError:
            transport = answered.transport
            if transport is not None:
                transport.abort()
            raise ConnectionAbortedError("the client took nothing of its answer for --read-timeout") from None

    def own_answer(self, answered: Answer, status: int, headers: dict[str, str], text: str) -> None:
        """The proxy's own answer (an error): `headers` and `text` as given (fixed text, never a
        request byte), with Content-Length, Date and, unless `answered.keep_alive`, Connection:
        close. No body after a HEAD request."""
        body = text.encode("utf-8")
        parts = [self._status_line(answered.version, status, None)]
        parts += [b"%s: %s\r\n" % (n.encode("latin-1"), v.encode("latin-1")) for n, v in headers.items()]
        parts.append(b"Content-Length: %d\r\n%s\r\n" % (len(body), self._date()))
        if not answered.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif answered.version == (1, 0):
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(_CRLF)
        if answered.method != "HEAD":
            parts.append(body)
        _write(answered, parts, 0)

    def _last_chunk(self, trailers: list[tuple[bytes, bytes]]) -> bytes:
        """The chunked body's end, with the upstream's trailer fields (hop-by-hop ones dropped)."""
        if not trailers:
            return _LAST_CHUNK
        lines, _, _ = self._header_lines(trailers, dated=False)
        if not lines:
            return _LAST_CHUNK
        return b"0\r\n" + _field_block(lines) + b"\r\n\r\n"

    def interim(self, answered: Answer, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Forwards an upstream 1xx response (RFC 9110 §15.2) ahead of the final one; HTTP/1.0
        clients get none. Called from the upstream connection's receive path: no await."""
        transport = answered.transport
        if answered.version < (1, 1) or transport is None or transport.is_closing():
            return
        lines, _, _ = self._header_lines(headers, dated=False)
        parts = [self._status_line(answered.version, status, None)]
        if lines:
            parts += (_field_block(lines), _CRLF)
        parts.append(_CRLF)
        transport.write(b"".join(parts))

    def _header_lines(
        self, headers: list[tuple[bytes, bytes]], dated: bool = True
    ) -> tuple[list[bytes], int | None, bool]:
        """`name: value` lines to forward (Date added when missing and `dated`), the declared
        length and whether trailers were announced (a `Trailer` field)."""
        lines = []
        length = None
        announced = False
        names = self._names
        for name, value in headers:
            kind = names.get(name)
            if kind is None:
                kind = self._classify(name)
            if kind == _FORWARD:
                lines.append(name + _COLON + value)
            elif kind == _LENGTH:
                length = int(value)
            elif kind == _DATE:
                dated = False
                lines.append(name + _COLON + value)
            elif kind == _TRAILER:
                announced = True
                lines.append(name + _COLON + value)
        if dated:
            lines.append(self._date())
        return lines, length, announced

    def _classify(self, name: bytes) -> int:
        lname = name.decode("latin-1").lower()
        if lname == "content-length":
            kind = _LENGTH
        elif lname in DROP_RESPONSE:
            kind = _DROP
        elif lname == "date":
            kind = _DATE
        elif lname == "trailer":
            kind = _TRAILER
        else:
            kind = _FORWARD
        if len(self._names) < _CACHE_LIMIT:
            self._names[bytes(name)] = kind
        return kind

    def _status_line(self, version: tuple[int, int], status: int, reason: bytes | None) -> bytes:
        """The status line, with the upstream's own reason phrase when it gave one (HTTP/1.1
        upstreams), else the registered phrase (HTTP/2 has none)."""
        key = (version[0], version[1], status, reason)
        line = self._status_lines.get(key)
        if line is None:
            if reason is None:
                try:
                    reason = HTTPStatus(status).phrase.encode("latin-1")
                except ValueError:
                    reason = b""
            line = b"HTTP/%d.%d %d %s\r\n" % (version[0], version[1], status, reason)
            if b"\r" in reason or b"\n" in reason or b"\x00" in reason:
                raise UpstreamProtocolError("upstream sent a reason phrase with CR, LF or NUL")
            if len(self._status_lines) < _CACHE_LIMIT:
                self._status_lines[key] = line
        return line

    def _date(self) -> bytes:
        http_date(self._clock)
        return _date_cache[2]


# (second, its IMF-fixdate, the field line): formatting is costly, once a second will do
_date_cache: list = [-1, b"", b""]


def http_date(clock: Callable[[], float]) -> bytes:
    """The Date field value for now (RFC 9110 §6.6.1), for responses whose upstream sent none."""
    second = int(clock())
    if second != _date_cache[0]:
        value = formatdate(second, usegmt=True).encode("ascii")
        _date_cache[:] = [second, value, b"Date: " + value]
    return _date_cache[1]


def _write(answered: Answer, parts: list[bytes], size: int) -> None:
    """One send of the parts: joined when small, vectored (no copy of a big body) otherwise."""
    transport = answered.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client connection closed")
    answered.started = True
    if size < _SMALL_WRITE:
        transport.write(b"".join(parts))
    else:
        transport.writelines(parts)


def _field_block(lines: list[bytes]) -> bytes:
    """The field lines joined by CRLF; UpstreamProtocolError if a line holds a CR or LF of its
    own (response splitting)."""
    block = _CRLF.join(lines)
    if block.count(b"\r") != len(lines) - 1 or block.count(b"\n") != len(lines) - 1:
        raise UpstreamProtocolError("upstream sent a header with CR or LF in it")
    return block
