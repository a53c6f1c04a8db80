"""HPACK decoding (RFC 7541) of the response header blocks the lean HTTP/2 client receives.

Owns: one connection's copy of the peer's dynamic table (insertion, eviction by entry size, size
updates up to the limit we allow), decoding a complete header block into raw (name, value) bytes
pairs in order, the decoded header list size limit, a bounded process-wide cache of decoded
Huffman strings (response values such as server, content-type or a second's date repeat), and a
bounded process-wide cache of whole self-contained blocks (nginx sends the same bytes for every
response within a second: literals against the static table only), and the connection's last
block that left its table as it was (a client such as h2load repeats a request head as indices
into the table: decoded again to the same fields until the table changes). Literals
the peer marked never-indexed come back as `hpack.NeverIndexedHeaderTuple`, as `hpack` returns them.
The `hpack` library stays the test oracle and supplies the static table and the Huffman state
machine (`compat.hpack`); `hpack.Encoder` is not used. Must never: accept a block `hpack.Decoder` rejects, return
fields after an error, keep decoding once an error has put the table out of step with the peer's,
grow a table or cache without bound, or put a header name or value in an error message.
"""

from __future__ import annotations

from hpack import HPACKDecodingError, NeverIndexedHeaderTuple

from sigv4proxy.compat.hpack import STATIC_TABLE, decode_huffman

DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE: we never advertise another value
DEFAULT_MAX_HEADER_LIST_SIZE = 64 << 10
ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
MAX_CONTINUATION = 5  # integer continuation octets, as hpack: more is a decoding error
HUFFMAN_CACHE_ENTRIES = 1024
HUFFMAN_CACHE_MAX_KEY = 64  # longer encoded strings are decoded every time, never cached
BLOCK_CACHE_ENTRIES = 256
BLOCK_CACHE_MAX_KEY = 1024  # longer blocks are decoded every time, never cached

_STATIC = ((b"", b""), *STATIC_TABLE)  # index 0 is rejected before any lookup
_STATIC_LAST = len(_STATIC) - 1  # 61

_huffman_cache: dict[bytes, bytes] = {}
# A block that refers to no dynamic table entry and updates no table size decodes the same
# whatever the table holds: block -> (fields, entries it inserts in order, header list size).
_block_cache: dict[bytes, tuple[tuple, tuple, int]] = {}


def decodes_alike(block: bytes) -> bool:
    """`block` decodes to the same fields on every connection whatever its table holds (it is in
    the cache of self-contained blocks): what callers derive from those fields may be cached too."""
    return type(block) is bytes and block in _block_cache


class HpackDecodeError(ValueError):
    """The header block cannot be decoded; the connection must end with COMPRESSION_ERROR."""


def _huffman(encoded: bytes) -> bytes:
    """Decodes a Huffman string (§5.2) the cache did not have, and caches short ones."""
    try:
        decoded = decode_huffman(encoded)
    except HPACKDecodingError:  # an EOS symbol, or padding that is too long or not all ones
        raise HpackDecodeError("invalid Huffman string") from None
    if len(encoded) <= HUFFMAN_CACHE_MAX_KEY:
        if len(_huffman_cache) >= HUFFMAN_CACHE_ENTRIES:
            _huffman_cache.clear()
        _huffman_cache[encoded] = decoded
    return decoded


def _integer(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """Continues an integer whose prefix was all ones (§5.1): (value, position after it)."""
    shift = 0
    for _ in range(MAX_CONTINUATION):
        octet = data[pos]  # IndexError: truncated, reported by the caller
        pos += 1
        value += (octet & 0x7F) << shift
        if octet < 0x80:
            return value, pos
        shift += 7
    raise HpackDecodeError("integer encoding too long")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    """A string literal (§5.2) at `pos`, Huffman-decoded if marked: (bytes, position after it)."""
    first = data[pos]  # IndexError: truncated, reported by the caller
    length = first & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _integer(data, pos, length)
    stop = pos + length
    if stop > len(data):
        raise HpackDecodeError("truncated header block")
    value = data[pos:stop]
    if first & 0x80:
        decoded = _huffman_cache.get(value)
        value = _huffman(value) if decoded is None else decoded
    return value, stop


def _evict(entries: list, size: int, maxsize: int) -> int:
    """Drops the oldest entries until the table fits `maxsize`: the new size."""
    while size > maxsize:
        old = entries.pop(0)
        size -= ENTRY_OVERHEAD + len(old[0]) + len(old[1])
    return size


def _insert(entries: list, size: int, maxsize: int, field: tuple[bytes, bytes], entry: int) -> int:
    """Adds `field` (of size `entry`) to the dynamic table, evicting the oldest: the new size."""
    if entry > maxsize:  # §4.4: an entry larger than the table empties it
        entries.clear()
        return 0
    entries.append(field)
    return _evict(entries, size + entry, maxsize)


class HeaderBlockDecoder:
    """Decodes one connection's response header blocks in the order the peer sent them."""

    __slots__ = (
        "max_header_list_size",
        "max_table_size",
        "generation",
        "_entries",
        "_size",
        "_maxsize",
        "_failed",
        "_repeat",
    )

    def __init__(
        self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE, max_table_size: int = DEFAULT_TABLE_SIZE
    ) -> None:
        self.max_header_list_size = max_header_list_size  # sum of 32 + name + value per field
        self.max_table_size = max_table_size  # what we advertised; size updates may not exceed it
        self._entries: list[tuple[bytes, bytes]] = []  # the dynamic table, newest last
        self._size = 0  # sum of the entries' sizes
        self._maxsize = max_table_size  # the peer's current table size
        self._failed = False
        # Counts the blocks decoded afresh: while it stands still, every block decoded was the
        # last one again, read against the same table, so its fields are the same objects.
        self.generation = 0
        # The last block and its (fields, header list size) when it neither inserted nor resized:
        # the table it was read against is still this one (any change comes with a new decode).
        self._repeat: tuple[bytes, tuple, int] | None = None

    @property
    def table_size(self) -> int:
        """The dynamic table's current maximum size, as the peer last set it."""
        return self._maxsize

    def decode(self, block: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
        """The block's fields in order; raises HpackDecodeError (and fails for good) if invalid."""
        if self._failed:
            raise HpackDecodeError("decoder failed earlier")
        data = block if isinstance(block, bytes) else bytes(block)
        repeat = self._repeat
        if repeat is not None and repeat[0] == data:
            if repeat[2] > self.max_header_list_size:
                self._failed = True
                raise HpackDecodeError("header list too large")
            return list(repeat[1])
        self.generation += 1
        self._repeat = None
        cached = _block_cache.get(data)
        if cached is not None:
            fields = self._replay(*cached)
            if not cached[1] and len(data) <= BLOCK_CACHE_MAX_KEY:
                self._repeat = (data, cached[0], cached[2])
            return fields
        try:
            return self._decode(data)
        except HpackDecodeError:
            self._failed = True
            raise
        except IndexError:  # read past the end of the block
            self._failed = True
            raise HpackDecodeError("truncated header block") from None

    def _replay(self, fields: tuple, inserted: tuple, listed: int) -> list[tuple[bytes, bytes]]:
        """A cached self-contained block: its inserts applied to this table, its fields."""
        if listed > self.max_header_list_size:
            self._failed = True
            raise HpackDecodeError("header list too large")
        if inserted:
            entries, size, maxsize = self._entries, self._size, self._maxsize
            for field in inserted:
                size = _insert(entries, size, maxsize, field, ENTRY_OVERHEAD + len(field[0]) + len(field[1]))
            self._size = size
        return list(fields)

    def _decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = []
        inserted: list[tuple[bytes, bytes]] = []
        contained = True  # no dynamic table reference, no size update: cacheable
        resized = False  # a size update: the table may have changed without an insert
        append = fields.append
        entries = self._entries
        size = self._size
        maxsize = self._maxsize
        limit = self.max_header_list_size
        static = _STATIC
        last = _STATIC_LAST
        overhead = ENTRY_OVERHEAD
        end = len(data)
        listed = 0  # decoded header list size so far
        pos = 0
        while pos < end:
            octet = data[pos]
            pos += 1
            if octet & 0x80:  # indexed field (§6.1)
                index = octet & 0x7F
                if index == 0x7F:
                    index, pos = _integer(data, pos, index)
                if index <= last:
                    if not index:
                        raise HpackDecodeError("index 0")
                    field = static[index]
                elif index - last <= len(entries):
                    field = entries[last - index]
                    contained = False
                else:
                    raise HpackDecodeError("index past the tables")
                append(field)
                listed += overhead + len(field[0]) + len(field[1])
                if listed > limit:
                    raise HpackDecodeError("header list too large")
                continue
            if octet & 0x40:  # literal with incremental indexing (§6.2.1)
                index = octet & 0x3F
                if index == 0x3F:
                    index, pos = _integer(data, pos, index)
            elif octet & 0x20:  # dynamic table size update (§6.3)
                contained = False
                resized = True
                if fields:
                    raise HpackDecodeError("table size update after a field")
                maxsize = octet & 0x1F
                if maxsize == 0x1F:
                    maxsize, pos = _integer(data, pos, maxsize)
                if maxsize > self.max_table_size:
                    raise HpackDecodeError("table size update above the maximum")
                size = _evict(entries, size, maxsize)
                continue
            else:  # literal without indexing (§6.2.2) or never indexed (§6.2.3)
                index = octet & 0x0F
                if index == 0x0F:
                    index, pos = _integer(data, pos, index)
            # the name: indexed (never 0 here) or a string
            if index:
                if index <= last:
                    name = static[index][0]
                elif index - last <= len(entries):
                    name = entries[last - index][0]
                    contained = False
                else:
                    raise HpackDecodeError("index past the tables")
            else:
                name, pos = _string(data, pos)
            value, pos = _string(data, pos)  # the value: always a string
            entry = overhead + len(name) + len(value)
            if octet & 0x40:
                field = (name, value)
                size = _insert(entries, size, maxsize, field, entry)
                inserted.append(field)
                append(field)
            elif octet & 0x10:
                # appended as made: held in a tuple-typed local, the compiled build would unbox it
                # and lose the subclass
                append(NeverIndexedHeaderTuple(name, value))
            else:
                append((name, value))
            listed += entry
            if listed > limit:
                raise HpackDecodeError("header list too large")
        self._size = size
        self._maxsize = maxsize
        if contained and end <= BLOCK_CACHE_MAX_KEY:
            if len(_block_cache) >= BLOCK_CACHE_ENTRIES:
                _block_cache.clear()
            _block_cache[data] = (tuple(fields), tuple(inserted), listed)
        if not inserted and not resized and end <= BLOCK_CACHE_MAX_KEY:
            self._repeat = (data, tuple(fields), listed)
        return fields
