"""HTTP/2 wire bytes for the lean client (and the lean inbound server's frames): frames, HPACK
request blocks, response field checks.

Owns: the frame/settings/error-code numbers of RFC 9113, building frames as bytes, and encoding a
request's header block from precomputed HPACK bytes (RFC 7541): static-table indexed fields where
the whole field is in the table, otherwise never-indexed literals (§6.2.3) without Huffman, with
the name indexed from the static table when it is there. The encoder never inserts into the dynamic
table, so the peer's table size only needs acknowledging. Also the cheap validity checks of a
response's decoded fields. Must never: keep per-connection state beyond small bounded caches, read
a socket, send a field it has not checked, or put a header value in an error message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from sigv4proxy.compat.hpack import STATIC_TABLE
from sigv4proxy.errors import BadRequest
from sigv4proxy.fields import BAD_VALUE, VALID_NAMES, MalformedFields, name_problem, parse_content_length

# --- RFC 9113 numbers ---
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x4, 0x5, 0x6, 0x7
CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x8, 0x9, 0xB

ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ProtocolViolation(Exception):
    """A connection error found while reading frames (RFC 9113 §5.4.1): the reader stops and the
    connection ends with GOAWAY(code). Raised and caught inside one endpoint's frame loop."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
MAX_STREAM_ID = (1 << 31) - 1

# 24-bit length as (high byte, low 16 bits), type, flags, stream id (reserved bit masked by readers)
FRAME_HEADER = struct.Struct(">BHBBL")
_pack_header = FRAME_HEADER.pack
SETTING = struct.Struct(">HL")  # one SETTINGS entry: identifier, value
_U32 = struct.Struct(">L")


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _pack_header(n >> 16, n & 0xFFFF, frame_type, flags, stream_id) + payload


def frame_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return _pack_header(length >> 16, length & 0xFFFF, frame_type, flags, stream_id)


def settings_frame(settings: Sequence[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in settings))


SETTINGS_ACK = frame(SETTINGS, FLAG_ACK, 0)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway_frame(last_stream_id: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code))


def ping_ack_frame(opaque: bytes) -> bytes:
    return frame(PING, FLAG_ACK, 0, opaque)


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame_size: int) -> list[bytes]:
    """HEADERS (+ CONTINUATION when the block exceeds the peer's max frame size), as byte parts."""
    end_flag = FLAG_END_STREAM if end_stream else 0
    n = len(block)
    if n <= max_frame_size:
        return [_pack_header(n >> 16, n & 0xFFFF, HEADERS, end_flag | FLAG_END_HEADERS, stream_id), block]
    view = memoryview(block)
    parts: list[bytes] = [frame_header(HEADERS, end_flag, stream_id, max_frame_size), view[:max_frame_size]]  # type: ignore[list-item]
    offset = max_frame_size
    while offset < n:
        step = min(max_frame_size, n - offset)
        flags = FLAG_END_HEADERS if offset + step == n else 0
        parts.append(frame_header(CONTINUATION, flags, stream_id, step))
        parts.append(view[offset : offset + step])  # type: ignore[arg-type]
        offset += step
    return parts


def data_frames(parts: list, stream_id: int, view: memoryview, end_stream: bool, max_frame_size: int) -> None:
    """Appends DATA frames carrying all of `view` to `parts` (no copy of the payload)."""
    n = len(view)
    offset = 0
    while True:
        step = min(max_frame_size, n - offset)
        last = offset + step == n
        flags = FLAG_END_STREAM if (last and end_stream) else 0
        parts.append(_pack_header(step >> 16, step & 0xFFFF, DATA, flags, stream_id))
        if step:
            parts.append(view[offset : offset + step])
        offset += step
        if last:
            return


# --- HPACK (RFC 7541) ---
def hpack_int(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """An HPACK integer with an N-bit prefix, `first_byte` holding the pattern bits (§5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


PREBUILT_LENGTHS = 4096  # string lengths below this have their HPACK prefix prebuilt
LENGTH_PREFIXES = tuple(hpack_int(n, 7, 0) for n in range(PREBUILT_LENGTHS))  # string length prefixes


def hpack_string(data: bytes) -> bytes:
    """A string literal without Huffman coding (§5.2)."""
    n = len(data)
    return (LENGTH_PREFIXES[n] if n < PREBUILT_LENGTHS else hpack_int(n, 7, 0)) + data


WITHOUT_INDEXING = 0x00  # literal header field without indexing: 0000xxxx, 4-bit name index (§6.2.2)
NEVER_INDEXED = 0x10  # literal header field never indexed: 0001xxxx, 4-bit name index (§6.2.3)
STATIC_NAME_INDEX: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(STATIC_TABLE, start=1):
    STATIC_NAME_INDEX.setdefault(_name, _index)


def literal_name(name: bytes, pattern: int) -> bytes:
    """The name part of a literal field that is not indexed (`pattern` NEVER_INDEXED or
    WITHOUT_INDEXING): the static index when the name has one."""
    index = STATIC_NAME_INDEX.get(name)
    if index is not None:
        return hpack_int(index, 4, pattern)
    return bytes((pattern,)) + hpack_string(name)


def never_indexed_name(name: bytes) -> bytes:
    """The name part of a never-indexed literal."""
    return literal_name(name, NEVER_INDEXED)


_METHODS = {b"GET": b"\x82", b"POST": b"\x83"}  # static entries 2 and 3
_PATH_ROOT = b"\x84"  # static entry 4
_SCHEMES = {"http": b"\x86", "https": b"\x87"}  # static entries 6 and 7
_NAME_METHOD = never_indexed_name(b":method")
_NAME_AUTHORITY = never_indexed_name(b":authority")
_NAME_PATH = never_indexed_name(b":path")
_CACHE_LIMIT = 256  # names/authorities remembered per encoder; beyond that, encoded each time


class RequestHeaderEncoder:
    """Encodes request header blocks; one per connection (holds only bounded byte caches)."""

    __slots__ = ("_scheme", "_authorities", "_names", "_prefix")

    def __init__(self, scheme: str) -> None:
        self._scheme = _SCHEMES[scheme]
        self._authorities: dict[bytes, bytes] = {}
        self._names: dict[bytes, bytes] = {}
        self._prefix = b""  # a pending dynamic table size update

    def peer_table_size_changed(self) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: announce our (empty) table as size 0.

        We never insert, so size 0 is always within the peer's limit (§4.2, §6.3).
        """
        self._prefix = b"\x20"

    def encode(self, method: bytes, target: bytes, authority: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """The header block: :method, :scheme, :authority, :path, then `headers` in order.

        Refuses (BadRequest, as `base.check_request_fields`) CR, LF or NUL anywhere, spaces in
        the request line parts, empty method/target and bad names; names are checked once each.
        """
        if not method or not target:
            raise BadRequest("request method or target is empty")
        if target.find(b" ") >= 0:
            raise BadRequest(_BAD_LINE)
        parts = [self._prefix] if self._prefix else []
        encoded = _METHODS.get(method)
        if encoded is None:
            _check_request_line_part(method)
            encoded = _NAME_METHOD + hpack_string(method)
        parts.append(encoded)
        parts.append(self._scheme)
        encoded = self._authorities.get(authority)
        if encoded is None:
            _check_request_line_part(authority)
            encoded = _NAME_AUTHORITY + hpack_string(authority)
            if len(self._authorities) < _CACHE_LIMIT:
                self._authorities[bytes(authority)] = encoded
        parts.append(encoded)
        if target == b"/":
            parts.append(_PATH_ROOT)
        else:
            n = len(target)
            parts.append(_NAME_PATH)
            parts.append(LENGTH_PREFIXES[n] if n < PREBUILT_LENGTHS else hpack_int(n, 7, 0))
            parts.append(target)
        names = self._names
        append = parts.append
        lengths = LENGTH_PREFIXES
        for name, value in headers:
            prefix = names.get(name)
            if prefix is None:
                if not name or b"\r" in name or b"\n" in name or b"\x00" in name or b":" in name:
                    raise BadRequest(_BAD_FIELD)
                prefix = never_indexed_name(name.lower())  # RFC 9113 8.2.1: lowercase only
                if len(names) < _CACHE_LIMIT:
                    names[bytes(name)] = prefix
            n = len(value)
            append(prefix)
            append(lengths[n] if n < PREBUILT_LENGTHS else hpack_int(n, 7, 0))
            append(value)
        # the target and all values checked in one pass: cheaper than three scans of each
        values = [value for _, value in headers]
        values.append(target)
        joined = b"\t".join(values)
        if joined.find(b"\r") >= 0 or joined.find(b"\n") >= 0 or joined.find(b"\x00") >= 0:
            _check_request_line_part(target)
            raise BadRequest(_BAD_FIELD)
        self._prefix = b""
        return b"".join(parts)


_BAD_FIELD = "request header contains CR, LF or NUL, or a bad name"


_BAD_LINE = "request line contains CR, LF, NUL or a space"


def _check_request_line_part(part: bytes) -> None:
    if b"\r" in part or b"\n" in part or b"\x00" in part or b" " in part:
        raise BadRequest(_BAD_LINE)


# --- response header checks (RFC 9113 §8.2, §8.3.2): the rules are in `fields`, shared ---
def check_fields(
    fields: Sequence[tuple[bytes, bytes]], trailers: bool
) -> tuple[bytes | None, list[tuple[bytes, bytes]], int]:
    """(:status, regular fields, content-length or -1); raises MalformedFields with a fixed reason.

    Trailers may carry no pseudo-header at all.
    """
    status: bytes | None = None
    regular: list[tuple[bytes, bytes]] = []
    content_length = -1
    valid_names = VALID_NAMES
    # Each field held as an object: compiled (mypyc), a tuple-typed variable is unboxed and would
    # drop an hpack NeverIndexedHeaderTuple, which must reach the client as it came.
    entries: Sequence[object] = fields
    name: bytes
    value: bytes
    for field in entries:
        name, value = field  # type: ignore[misc]
        if name[:1] == b":":
            if trailers or regular or name != b":status" or status is not None:
                raise MalformedFields("misplaced or unknown pseudo-header")
            status = value
            continue
        if name not in valid_names and name_problem(name, value) is not None:
            raise MalformedFields("invalid or connection-specific header name")
        if BAD_VALUE.search(value):
            raise MalformedFields("CR, LF or NUL in a header value")
        if name == b"content-length":
            length = parse_content_length(value)
            if length < 0 or 0 <= content_length != length:
                raise MalformedFields("invalid content-length")
            content_length = length
        regular.append(field)  # type: ignore[arg-type]
    return status, regular, content_length
