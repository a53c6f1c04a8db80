"""Writing an upstream response back over the inbound HTTP/1.1 connection, bytes of our own.

Owns: the status line and header block (names, values, order and repeats as the upstream sent
them; hop-by-hop fields and Content-Length dropped), the framing (Content-Length when the upstream
declared one, chunked to an HTTP/1.1 client otherwise, close-delimited to HTTP/1.0; no body after
HEAD, 1xx, 204 or 304), Date when the upstream sent none, the keep-alive decision handed back to
aiohttp, and the transport's write backpressure. aiohttp's StreamResponse did the same in ~15 µs
more a request (a bare `web.Server`: 34 µs a request through it, 19 writing the bytes directly).
Must never: write a header line holding CR or LF (response splitting), keep writing past the
transport's high-water mark without waiting, or send a body where the message may have none.
"""

from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus
from typing import Callable

from aiohttp import web

from sigv4proxy.errors import UpstreamProtocolError
from sigv4proxy.header_rules import DROP_RESPONSE
from sigv4proxy.upstream.base import Response

_FORWARD, _DROP, _LENGTH, _DATE = 0, 1, 2, 3
_CACHE_LIMIT = 1024  # entries per cache: names and status lines come from upstreams
_EMPTY_BODY_STATUS = frozenset((204, 304, *range(100, 200)))
_NO_LENGTH_STATUS = frozenset((204, *range(100, 200)))  # RFC 9110 §8.6: no Content-Length at all
_COLON = b": "
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_SMALL_WRITE = 16 * 1024  # below this, parts are joined into one buffer; above, a vectored write


class Answered:
    """What aiohttp's request loop needs of a response already written: `prepare` and
    `write_eof` (nothing left to do) and `keep_alive` (whether the connection takes another)."""

    __slots__ = ("status", "keep_alive", "started", "body_bytes")

    def __init__(self, status: int) -> None:
        self.status = status
        self.keep_alive = False  # decided with the framing, before the head is written
        self.started = False  # a byte went out: from here on an error can only cut the connection
        self.body_bytes = 0  # body bytes relayed so far (for the access log)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class ResponseWriter:
    """One per worker: caches for header names, status lines and the Date of this second."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._names: dict[bytes, int] = {}  # raw name -> _FORWARD/_DROP/_LENGTH/_DATE (bounded)
        self._status_lines: dict[tuple[int, int, int], bytes] = {}
        self._date_second = -1
        self._date_line = b""

    async def relay(self, request: web.BaseRequest, upstream: Response, answered: Answered) -> None:
        """Writes `upstream` to the client, counting body bytes in `answered`. Errors propagate
        (ConnectionError, ProxyError; UpstreamProtocolError for a bad header); `answered.started`
        says whether the client can still get an error answer instead of a cut connection."""
        status = upstream.status
        version = request.version
        keep_alive = request.keep_alive
        head, length = self._header_lines(upstream.headers)
        empty = status in _EMPTY_BODY_STATUS or request.method == "HEAD"
        chunked = False
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
        pending = [self._status_line(version, status), block, b"\r\n\r\n"]
        pending_size = 0
        transport = request.transport
        protocol = request.protocol
        # Hold the latest chunk back so the last one leaves with the end of the message: one
        # write for head, body and end when the body is one chunk.
        async for chunk in upstream:
            if empty:
                continue  # nothing may follow this head; the upstream stream is still drained
            answered.body_bytes += len(chunk)
            if pending_size:
                answered.started = True
                _write(transport, pending, pending_size)
                if protocol.writing_paused:
                    await request.writer.drain()
                pending = []
                transport = request.transport
            pending_size = len(chunk)
            if chunked:
                pending += (b"%x\r\n" % pending_size, chunk, _CRLF)
            else:
                pending.append(chunk)
        if chunked:
            pending.append(_LAST_CHUNK)
        answered.started = True
        _write(transport, pending, pending_size)
        if protocol.writing_paused:  # a client that pipelines and never reads gets no more
            await request.writer.drain()

    def _header_lines(self, headers: list[tuple[bytes, bytes]]) -> tuple[list[bytes], int | None]:
        """`name: value` lines to forward (Date added when missing) and the declared length."""
        lines = []
        length = None
        dated = False
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
                dated = True
                lines.append(name + _COLON + value)
        if not dated:
            lines.append(self._date())
        return lines, length

    def _classify(self, name: bytes) -> int:
        lname = name.decode("latin-1").lower()
        if lname == "content-length":
            kind = _LENGTH
        elif lname in DROP_RESPONSE:
            kind = _DROP
        elif lname == "date":
            kind = _DATE
        else:
            kind = _FORWARD
        if len(self._names) < _CACHE_LIMIT:
            self._names[bytes(name)] = kind
        return kind

    def _status_line(self, version: tuple[int, int], status: int) -> bytes:
        key = (version[0], version[1], status)
        line = self._status_lines.get(key)
        if line is None:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
            line = f"HTTP/{version[0]}.{version[1]} {status} {reason}\r\n".encode("latin-1")
            if len(self._status_lines) < _CACHE_LIMIT:
                self._status_lines[key] = line
        return line

    def _date(self) -> bytes:
        second = int(self._clock())
        if second != self._date_second:
            self._date_line = b"Date: " + formatdate(second, usegmt=True).encode("ascii")
            self._date_second = second
        return self._date_line


def _write(transport, parts: list[bytes], last_size: int) -> None:
    """One send of the parts: joined when small, vectored (no copy of a big chunk) otherwise."""
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client connection closed")
    if last_size < _SMALL_WRITE:
        transport.write(b"".join(parts))
    else:
        transport.writelines(parts)
