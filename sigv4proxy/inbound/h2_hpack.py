"""HPACK for the inbound HTTP/2 servers: our own coder, which `compat.h2.ServerConnection` puts in
the `h2` library's encoder/decoder slots (the lean server, `h2server_lean`, uses the encoder and
`wire.hpack_decode` directly).

Owns: `ResponseHeaderEncoder` (response and trailer blocks to the app: static-table indices,
literals without indexing and without Huffman, never-indexed fields kept never-indexed) and
`H2HeaderDecoder` (h2's decoder interface on `wire.hpack_decode.HeaderBlockDecoder`, which the
lean upstream client already uses). Why: `hpack.Encoder` and `hpack.Decoder` were the largest
single cost of an inbound HTTP/2 request (docs/performance.md), in per-field Python calls and
debug-log calls that are off. Must never: insert into the dynamic table (so the peer's
SETTINGS_HEADER_TABLE_SIZE can never be exceeded), turn a never-indexed field into an indexable
one, or accept a block `hpack.Decoder` would reject.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import HeaderTuple, HPACKDecodingError, OversizedHeaderListError

from sigv4proxy.compat.hpack import STATIC_TABLE
from sigv4proxy.wire.h2_wire import (
    LENGTH_PREFIXES,
    NEVER_INDEXED,
    PREBUILT_LENGTHS,
    WITHOUT_INDEXING,
    hpack_int,
    literal_name,
)
from sigv4proxy.wire.hpack_decode import HeaderBlockDecoder, HpackDecodeError

_SIZE_UPDATE_ZERO = b"\x20"  # §6.3: dynamic table size 0
_NAMES_LIMIT = 512  # name prefixes remembered per connection (names come from the upstream)
_STATIC_FIELDS: dict[object, bytes] = {
    (name, value): bytes((0x80 | index,))  # §6.1 indexed field, all indices < 128
    for index, (name, value) in enumerate(STATIC_TABLE, start=1)
    if value
}


class ResponseHeaderEncoder:
    """Stands in for `hpack.Encoder` on one inbound connection (`h2` calls `encode` and sets
    `header_table_size`). Stateless on the wire: it never indexes, so it never has a table to
    keep in step with the client's."""

    __slots__ = ("_names", "_prefix")

    def __init__(self) -> None:
        self._names: dict[tuple[bytes, int], bytes] = {}
        self._prefix = b""

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # The client changed SETTINGS_HEADER_TABLE_SIZE: the next block starts with a size update
        # (§4.2); 0 is within any limit and says what is true, that we keep no entries.
        self._prefix = _SIZE_UPDATE_ZERO

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        parts = [self._prefix] if self._prefix else []
        self._prefix = b""
        append = parts.append
        names = self._names
        static = _STATIC_FIELDS
        lengths = LENGTH_PREFIXES
        # Each field held as an object, not as a typed tuple: compiled (mypyc), a tuple-typed
        # variable is unboxed and would drop the NeverIndexedHeaderTuple subclass.
        fields: Iterable[object] = headers
        name: bytes
        value: bytes
        for field in fields:
            name, value = field  # type: ignore[misc]
            sensitive = type(field) is not tuple and isinstance(field, HeaderTuple) and not field.indexable
            if not sensitive:
                indexed = static.get(field)
                if indexed is not None:
                    append(indexed)
                    continue
            pattern = NEVER_INDEXED if sensitive else WITHOUT_INDEXING
            prefix = names.get((name, pattern))
            if prefix is None:
                prefix = literal_name(name, pattern)
                if len(names) < _NAMES_LIMIT:
                    names[(bytes(name), pattern)] = prefix
            append(prefix)
            n = len(value)
            append(lengths[n] if n < PREBUILT_LENGTHS else hpack_int(n, 7, 0))  # §5.2, without Huffman
            append(value)
        return b"".join(parts)


class H2HeaderDecoder(HeaderBlockDecoder):
    """Stands in for `hpack.Decoder` on one inbound connection: `h2` sets `max_header_list_size`
    and `max_allowed_table_size` and calls `decode(block, raw=True)`, expecting hpack's exceptions
    on a bad block."""

    __slots__ = ()

    @property
    def max_allowed_table_size(self) -> int:
        return self.max_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self.max_table_size = value

    def decode(self, block: bytes | bytearray | memoryview, raw: bool = False) -> list[tuple[bytes, bytes]]:
        try:
            return super().decode(block)
        except HpackDecodeError as exc:
            if str(exc) == "header list too large":  # h2 answers this one with ENHANCE_YOUR_CALM
                raise OversizedHeaderListError(str(exc)) from None
            raise HPACKDecodingError(str(exc)) from None
