"""Sans-IO HTTP/1.1 response parser: bytes in, callbacks out, one response at a time.

Owns: the response grammar the client accepts (status line, header fields, Content-Length, chunked
with trailers, close-delimited bodies, no body for HEAD/1xx/204/304, interim 1xx handed on before
the final response), the framing decision (how the body ends, whether the socket may be kept
alive), dropping the fields the response's Connection names (this hop's only), and the bounds on
what it buffers. `http1.HTTP1Connection` feeds it and owns the socket and the exchange. Must never:
read or write a socket, await, buffer more than one head (or chunk line) past its bound, let a
malformed or truncated response pass as complete, or put a header value in an error message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sigv4proxy.errors import UpstreamProtocolError

MAX_HEAD = 64 * 1024  # status line + headers (and trailers)
MAX_CHUNK_LINE = 4096
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_NO_BODY_STATUSES = (204, 304)

# parser phases
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)

Fields = list[tuple[bytes, bytes]]

# What a header name means to the framing; names are checked once and remembered (bounded: they
# come from upstreams), so a known name costs one dict lookup.
_OTHER, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION = range(4)
_SPECIAL = {b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING, b"connection": _CONNECTION}
_PLAIN_CONNECTION = (b"close", b"keep-alive")  # the Connection values that name no field
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field-name
_NAME_KINDS: dict[bytes, int] = {}
_NAME_KINDS_LIMIT = 4096
_LINE_END_BYTES = (13, 10)  # CR, LF


def _name_kind(name: bytes) -> int:
    if not _TOKEN.fullmatch(name):  # also empty, surrounding or inner whitespace, obs-fold
        raise UpstreamProtocolError("upstream sent a malformed header line")
    kind = _SPECIAL.get(name.lower(), _OTHER)
    if len(_NAME_KINDS) < _NAME_KINDS_LIMIT:
        _NAME_KINDS[name] = kind
    return kind


def parse_fields(block: bytes) -> tuple[Fields, list[tuple[int, bytes]]]:
    """Header (or trailer) lines joined by CRLF as (name, value) pairs (names as received, values
    trimmed), and (kind, value) of the few that matter to the framing, in order."""
    if not block:
        return [], []
    # Every CR and LF must be part of a line end: any other one (bare, or beside a CRLF) splits
    # off a line that split(CRLF) does not; one the block ends with, splitlines drops. Cheaper
    # than counting each (bytes.count walks byte by byte); `.find`, not `in`: on 3.11 `bytes in
    # bytes` first tries its operand as an int and builds a TypeError to drop.
    lines = block.split(b"\r\n")
    if len(block.splitlines()) != len(lines) or block[-1] in _LINE_END_BYTES or block.find(b"\x00") >= 0:
        raise UpstreamProtocolError("upstream sent a forbidden character in a header")
    fields: Fields = []
    framing: list[tuple[int, bytes]] = []
    known = _NAME_KINDS
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise UpstreamProtocolError("upstream sent a malformed header line")
        kind = known.get(name)
        if kind is None:
            kind = _name_kind(name)
        value = value.strip(b" \t")
        fields.append((name, value))
        if kind:
            framing.append((kind, value))
    return fields, framing


class ResponseParser:
    """Parses the response to the request last `start`ed; raises UpstreamProtocolError on bad bytes.

    Calls `on_interim(status, headers)` for each 1xx response (not 101), `on_head(status, reason,
    headers)` for the final response head, `on_body(data)` per body piece and `on_end(trailers)`
    once the body is complete (then `keep_alive` and `has_leftover` say whether the socket may
    carry another request).
    """

    __slots__ = (
        "_buf",
        "_tail",
        "_phase",
        "_remaining",
        "_is_head",
        "keep_alive",
        "_on_head",
        "_on_body",
        "_on_end",
        "_on_interim",
    )

    def __init__(
        self,
        on_head: Callable[[int, bytes, Fields], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[Fields], None],
        on_interim: Callable[[int, Fields], None] = lambda status, fields: None,
    ) -> None:
        self._buf = bytearray()
        self._tail = 0  # bytes after a head being parsed, not yet in `_buf`
        self._phase = _DONE
        self._remaining = 0  # body bytes left (Content-Length or current chunk)
        self._is_head = False
        self.keep_alive = False
        self._on_head = on_head
        self._on_body = on_body
        self._on_end = on_end
        self._on_interim = on_interim

    def start(self, is_head: bool) -> None:
        """Expect the response to a new request (`is_head`: a HEAD request, so no body)."""
        self._phase = _HEAD
        self._tail = 0
        self._is_head = is_head
        self.keep_alive = False

    @property
    def done(self) -> bool:
        """No response is expected: any byte now is a protocol error."""
        return self._phase == _DONE

    @property
    def until_close(self) -> bool:
        """The body runs until the peer closes the connection."""
        return self._phase == _UNTIL_CLOSE

    @property
    def has_leftover(self) -> bool:
        return bool(self._buf or self._tail)

    def feed_eof(self) -> None:
        """The peer closed: a close-delimited body ends here."""
        if self._phase == _UNTIL_CLOSE:
            self._finish([])

    def feed(self, data: bytes) -> None:
        if not self._buf:  # fast paths: a whole head, or body bytes, that need no buffering
            phase = self._phase
            if phase == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    rest = self._tail = len(data) - end - 4  # a response ending at its head sees them
                    self._on_head_bytes(data[:end])
                    self._tail = 0
                    if not rest:
                        return
                    if self._phase == _LENGTH and rest <= self._remaining:
                        # The usual small answer, whole in one read: the body straight from it
                        self._remaining -= rest
                        self._on_body(data[end + 4 :])
                        if not self._remaining:
                            self._finish([])
                    else:  # an interim head's final one, a chunked body, bytes past the end
                        self._buf += memoryview(data)[end + 4 :]
                        self._parse()
                    return
            elif phase == _LENGTH and len(data) <= self._remaining:
                self._remaining -= len(data)
                self._on_body(data)
                if not self._remaining:
                    self._finish([])
                return
            if phase == _UNTIL_CLOSE:
                self._on_body(data)
                return
        self._buf += data  # bytes beyond a body fall through for the slow path to judge
        self._parse()

    def _finish(self, trailers: Fields) -> None:
        self._phase = _DONE
        self._on_end(trailers)

    def _parse(self) -> None:
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
                del buf[: end + 4]
                self._on_head_bytes(head)
            elif phase == _LENGTH or phase == _CHUNK_DATA:
                take = min(self._remaining, len(buf))
                self._on_body(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if not self._remaining:
                    if phase == _LENGTH:
                        self._finish([])
                    else:
                        self._phase = _CHUNK_END
            elif phase == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise UpstreamProtocolError("upstream chunk size line too long")
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
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
                    self._finish([])
                    continue
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamProtocolError("upstream trailers too large")
                    return
                trailers, _ = parse_fields(bytes(buf[:end]))
                del buf[: end + 4]
                self._finish(trailers)
            elif phase == _UNTIL_CLOSE:
                self._on_body(bytes(buf))
                buf.clear()
            else:  # _DONE: bytes after a complete response (no pipelining here)
                raise UpstreamProtocolError("upstream sent bytes after the response")

    def _on_head_bytes(self, head: bytes) -> None:
        status_line, _, block = head.partition(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        status_text = rest[:3]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or not status_text.isdigit()
            or (len(rest) > 3 and rest[3:4] != b" ")
        ):
            raise UpstreamProtocolError("upstream sent a malformed status line")
        status = int(status_text)
        if status_line.find(b"\r") >= 0 or status_line.find(b"\n") >= 0 or status_line.find(b"\x00") >= 0:
            raise UpstreamProtocolError("upstream sent a malformed status line")
        if not 100 <= status <= 599:  # RFC 9110 §15: anything else is invalid (a library's own code)
            raise UpstreamProtocolError("upstream sent an invalid status code")
        fields, framing = parse_fields(block)
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamProtocolError("upstream switched protocols unasked")
            self._on_interim(status, fields)
            return  # interim response: the final one follows
        length: int | None = None
        transfer_chunked = has_te = False
        close = version == b"HTTP/1.0"
        for kind, value in framing:
            if kind == _CONTENT_LENGTH:
                if value.isdigit():  # the usual case; else a list of equal values is allowed
                    new_length = int(value)
                else:
                    values = {v.strip() for v in value.split(b",")}
                    if len(values) != 1 or not next(iter(values)).isdigit():
                        raise UpstreamProtocolError("upstream sent a bad Content-Length")
                    new_length = int(values.pop())
                if length is not None and new_length != length:
                    raise UpstreamProtocolError("upstream sent conflicting Content-Length")
                length = new_length
            elif kind == _TRANSFER_ENCODING:
                has_te = True
                transfer_chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            else:  # Connection
                lowered = value.lower()
                tokens = (lowered,) if lowered.find(b",") < 0 else {t.strip() for t in lowered.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    close = False
                if lowered not in _PLAIN_CONNECTION:  # it names fields: this hop's only (RFC 9110 §7.6.1)
                    hop = {t for t in tokens if t not in _PLAIN_CONNECTION}
                    if hop:
                        fields = [(n, v) for n, v in fields if n.lower() not in hop]
        self._on_head(status, rest[4:], fields)
        self.keep_alive = not close
        if self._is_head or status in _NO_BODY_STATUSES:
            self._finish([])
        elif has_te:
            self.keep_alive = self.keep_alive and transfer_chunked and length is None
            self._phase = _CHUNK_SIZE if transfer_chunked else _UNTIL_CLOSE
        elif length is not None:
            self._remaining = length
            self._phase = _LENGTH
            if not length:
                self._finish([])
        else:
            self.keep_alive = False
            self._phase = _UNTIL_CLOSE
