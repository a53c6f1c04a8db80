"""Our HPACK response decoder (`hpack_decode.HeaderBlockDecoder`) against `hpack.Decoder`.

`hpack` is the independent oracle: blocks come from `hpack.Encoder` (huffman on and off, sensitive
fields, table size changes) or from a small encoder here that can emit every representation of RFC
7541 §6; both decoders read the same blocks in the same order and must return the same fields
block after block (so the dynamic tables stay in step), or both reject the block.
"""

from __future__ import annotations

import hpack
import pytest
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from sigv4proxy.wire import hpack_decode
from sigv4proxy.wire.hpack_decode import HeaderBlockDecoder, HpackDecodeError

LIMIT = 1 << 20  # header list limit for the property tests (both decoders)
HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

common_names = st.sampled_from([b"server", b"date", b"content-type", b"content-length", b"etag",
                                b"x-amz-request-id", b"set-cookie", b":status", b"via"])
common_values = st.sampled_from([b"", b"200", b"nginx/1.22.1", b"Mon, 23 Nov 2026 16:50:00 GMT",
                                 b"application/octet-stream", b"4096", b"gzip, deflate"])
names = st.one_of(common_names, st.binary(min_size=1, max_size=40))
values = st.one_of(common_values, st.binary(max_size=60), st.binary(min_size=100, max_size=5000))
fields = st.tuples(names, values, st.booleans())  # (name, value, sensitive)
header_lists = st.lists(fields, max_size=12)
table_sizes = st.one_of(st.none(), st.integers(0, 4096), st.sampled_from([0, 32, 100, 4096]))


def fields_of(decoded: list) -> list[tuple[bytes, bytes, bool]]:
    """(name, value, never indexed) for comparing our output with hpack's."""
    return [(bytes(f[0]), bytes(f[1]), not getattr(f, "indexable", True)) for f in decoded]


def both_decode(ours: HeaderBlockDecoder, oracle: hpack.Decoder, block: bytes) -> list | None:
    """The decoded fields if both decoders accept the block, None if both reject it."""
    try:
        expected = fields_of(oracle.decode(block, raw=True))
    except hpack.HPACKDecodingError:
        expected = None
    try:
        got = fields_of(ours.decode(block))
    except HpackDecodeError:
        got = None
    assert got == expected
    return got


def pair(limit: int = LIMIT) -> tuple[HeaderBlockDecoder, hpack.Decoder]:
    return HeaderBlockDecoder(limit), hpack.Decoder(max_header_list_size=limit)


# --- (a) blocks from hpack.Encoder ---
@settings(max_examples=250, deadline=None)
@given(blocks=st.lists(st.tuples(header_lists, st.booleans(), table_sizes), min_size=1,
                       max_size=8))
def test_hpack_encoder_blocks_decode_identically(blocks):
    encoder = hpack.Encoder()
    ours, oracle = pair()
    for headers, huffman, table_size in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size
        block = encoder.encode(headers, huffman=huffman)
        got = both_decode(ours, oracle, block)  # never-indexed flags compared with hpack's
        assert [(n, v) for n, v, _ in got] == [(n, v) for n, v, _ in headers]
        assert ours.table_size == oracle.header_table_size


# --- every representation, from our own small encoder ---
def _int(value: int, prefix: int, flags: int) -> bytes:
    encoded = encode_integer(value, prefix)
    encoded[0] |= flags
    return bytes(encoded)


def _str(data: bytes, huffman: bool) -> bytes:
    if huffman:
        data = HUFFMAN.encode(data)
    return _int(len(data), 7, 0x80 if huffman else 0) + data


representations = st.one_of(
    st.tuples(st.just("indexed"), st.integers(1, 70)),
    st.tuples(st.sampled_from(["incremental", "without", "never"]),
              st.one_of(st.integers(1, 70), st.binary(max_size=20)), values, st.booleans()),
    st.tuples(st.just("size"), st.integers(0, 4096)),
)


def _encode(rep) -> bytes:
    if rep[0] == "indexed":
        return _int(rep[1], 7, 0x80)
    if rep[0] == "size":
        return _int(rep[1], 5, 0x20)
    kind, name, value, huffman = rep
    prefix, flags = {"incremental": (6, 0x40), "without": (4, 0x00), "never": (4, 0x10)}[kind]
    head = _int(name, prefix, flags) if isinstance(name, int) else bytes((flags,)) + _str(
        name, huffman)
    return head + _str(value, huffman)


@settings(max_examples=250, deadline=None)
@given(blocks=st.lists(st.lists(representations, max_size=10), min_size=1, max_size=8),
       limit=st.sampled_from([LIMIT, 200]))
def test_every_representation_decodes_like_hpack(blocks, limit):
    """Indexes past the dynamic table, late size updates and oversized lists included."""
    ours, oracle = pair(limit)
    for reps in blocks:
        if both_decode(ours, oracle, b"".join(_encode(rep) for rep in reps)) is None:
            break  # both rejected: the connection would end here


# --- (b) malformed blocks ---
def _huffman_value(encoded: bytes) -> bytes:
    """A never-indexed field named `a` whose value is the given raw Huffman bytes."""
    return b"\x10\x01a" + _int(len(encoded), 7, 0x80) + encoded


MALFORMED = {  # block, the reason we give
    "name_length_missing": (b"\x00", "truncated"),
    "truncated_integer": (b"\xff", "truncated"),
    "truncated_continuation": (b"\xff\x80", "truncated"),
    "truncated_name": (b"\x40\x05ab", "truncated"),
    "truncated_value": (b"\x40\x01a\x05ab", "truncated"),
    "value_missing": (b"\x41", "truncated"),
    "truncated_long_length": (b"\x40\x7f", "truncated"),
    "length_past_the_end": (b"\x40\x01a\x7f\xff\x7f", "truncated"),
    "index_0": (b"\x80", "index 0"),
    "index_past_static_table": (b"\xbe", "past the tables"),
    "index_past_dynamic_table": (b"\x40\x01a\x01b\xbe\xbf", "past the tables"),
    "index_far_past": (b"\xff\xff\x0f", "past the tables"),
    "name_index_past_tables": (b"\x7e\x00", "past the tables"),
    "never_indexed_name_index_past": (b"\x1f\x2f\x00", "past the tables"),
    "size_update_above_max": (_int(4097, 5, 0x20), "above the maximum"),
    "size_update_far_above_max": (_int(1 << 30, 5, 0x20), "above the maximum"),
    "size_update_after_field": (b"\x88\x20", "after a field"),
    "integer_too_long": (b"\xff" + b"\xff" * 5 + b"\x01", "too long"),
    "integer_zero_padded_too_long": (b"\x0f" + b"\x80" * 5 + b"\x00\x00", "too long"),
    "length_integer_too_long": (b"\x40\x7f" + b"\x80" * 5 + b"\x00", "too long"),
    "huffman_zero_padding": (_huffman_value(b"\x18"), "Huffman"),  # 'a' (00011) then 000
    "huffman_padding_too_long": (_huffman_value(b"\x1f\xff"), "Huffman"),  # 'a', 11 one bits
    "huffman_eos": (_huffman_value(b"\xff\xff\xff\xff"), "Huffman"),
    "huffman_name_eos": (b"\x00\x84\xff\xff\xff\xff\x00", "Huffman"),
    "header_list_too_large": (b"\x00\x01a" + _int(70_000, 7, 0) + b"v" * 70_000, "too large"),
}


@pytest.mark.parametrize(("block", "reason"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_blocks_are_rejected_by_both(block, reason):
    with pytest.raises(hpack.HPACKDecodingError):
        hpack.Decoder().decode(block, raw=True)
    decoder = HeaderBlockDecoder()
    with pytest.raises(HpackDecodeError, match=reason):
        decoder.decode(block)
    with pytest.raises(HpackDecodeError, match="failed earlier"):  # the table is out of step
        decoder.decode(b"\x88")


def _literal(name: bytes, value: bytes, flags: int = 0x40) -> bytes:
    return bytes((flags,)) + _str(name, False) + _str(value, False)


EDGES = {  # sequences of blocks at the boundaries, each compared with hpack
    "five_continuation_octets": [b"\x0f" + b"\x80" * 4 + b"\x00\x00"],  # name index 15
    "largest_indexes": [b"".join(_literal(b"n%d" % i, b"") for i in range(120)),
                        _int(61 + 120, 7, 0x80) + _int(61 + 1, 7, 0x80) + _int(61, 7, 0x80)],
    "entry_exactly_the_table_size": [_int(100, 5, 0x20) + _literal(b"a", b"1" * 30),
                                     _literal(b"b", b"2" * 67), b"\xbe", b"\xbf"],
    "size_update_to_the_table_size_keeps": [_literal(b"a", b"1" * 30) + _literal(b"b", b"2"),
                                            _int(63 + 34, 5, 0x20) + b"\xbe\xbf"],
    "size_update_one_below_evicts": [_literal(b"a", b"1" * 30) + _literal(b"b", b"2"),
                                     _int(63 + 33, 5, 0x20) + b"\xbe", b"\xbf"],
    "insert_exactly_filling_keeps": [_int(127, 5, 0x20) + _literal(b"a", b"1" * 30),
                                     _literal(b"b", b"2" * 31), b"\xbf"],
    "insert_one_over_evicts": [_int(127, 5, 0x20) + _literal(b"a", b"1" * 30),
                               _literal(b"b", b"2" * 32), b"\xbe", b"\xbf"],
    "size_update_to_max": [_int(4096, 5, 0x20) + b"\x88"],
    "indexed_name_from_dynamic_table": [_literal(b"x-a", b"1"), b"\x7e\x01\x32\xbe\xbf",
                                        b"\x1f\x30\x013"],
    "empty_huffman_strings": [b"\x00\x80\x80", b"\x40\x81\x1f\x80\xbe"],
}


@pytest.mark.parametrize("blocks", list(EDGES.values()), ids=list(EDGES))
def test_boundary_blocks_decode_like_hpack(blocks):
    ours, oracle = pair()
    results = [both_decode(ours, oracle, block) for block in blocks]
    assert results[0] is not None


@pytest.mark.parametrize(("field", "size"), [(b"\x88", 32 + 7 + 3),
                                             (_literal(b"a", b"200", 0x00), 32 + 1 + 3)],
                         ids=["indexed", "literal"])
def test_header_list_limit_counts_32_plus_name_plus_value(field, size):
    first = _literal(b"a", b"v" * (100 - size - 33), 0x00)  # the two fields: 100 in all
    assert both_decode(*pair(100), first + field) is not None
    assert both_decode(*pair(99), first + field) is None


def test_table_evicts_oldest_by_size_and_an_oversized_entry_empties_it():
    ours, oracle = pair()
    block = _int(100, 5, 0x20)  # table of 100: one 32 + 1 + 30 = 63 entry fits, not two
    block += b"\x40\x01a" + _int(30, 7, 0) + b"1" * 30
    block += b"\x40\x01b" + _int(30, 7, 0) + b"2" * 30  # evicts a
    assert both_decode(ours, oracle, block + b"\xbe") is not None  # 62: b
    assert both_decode(ours, oracle, b"\xbe") == [(b"b", b"2" * 30, False)]
    assert both_decode(ours, oracle, b"\x40\x01c" + _int(70, 7, 0) + b"3" * 70) is not None
    assert both_decode(ours, oracle, b"\xbe") is None  # 103 > 100: the table is empty now


def test_size_update_to_zero_clears_and_several_updates_are_allowed_at_the_start():
    ours, oracle = pair()
    assert both_decode(ours, oracle, b"\x40\x01a\x01b\xbe") == [(b"a", b"b", False)] * 2
    assert both_decode(ours, oracle, b"\x20" + _int(4096, 5, 0x20) + b"\x88") is not None
    assert ours.table_size == 4096
    assert both_decode(ours, oracle, b"\xbe") is None


def test_accepts_bytearray_and_memoryview():
    block = hpack.Encoder().encode([(b":status", b"200"), (b"server", b"nginx")])
    for form in (bytearray(block), memoryview(block)):
        assert HeaderBlockDecoder().decode(form) == [(b":status", b"200"), (b"server", b"nginx")]


def test_huffman_cache_is_bounded_and_skips_long_strings(monkeypatch):
    monkeypatch.setattr(hpack_decode, "_huffman_cache", {})
    decoder = HeaderBlockDecoder()
    for n in range(hpack_decode.HUFFMAN_CACHE_ENTRIES + 10):
        value = b"value-%d" % n
        assert decoder.decode(_int(34, 4, 0) + _str(value, True)) == [(b"etag", value)]
        assert decoder.decode(_int(34, 4, 0) + _str(value, True)) == [(b"etag", value)]  # cached
        assert len(hpack_decode._huffman_cache) <= hpack_decode.HUFFMAN_CACHE_ENTRIES
    hpack_decode._huffman_cache.clear()
    long_value = b"x" * 200
    assert decoder.decode(_int(34, 4, 0) + _str(long_value, True)) == [(b"etag", long_value)]
    assert not hpack_decode._huffman_cache


# --- (c) fuzz ---
@settings(max_examples=300, deadline=None)
@given(blocks=st.lists(st.binary(max_size=48), min_size=1, max_size=4),
       limit=st.sampled_from([LIMIT, 64]))
def test_random_bytes_decode_like_hpack(blocks, limit):
    ours, oracle = pair(limit)
    for block in blocks:
        if both_decode(ours, oracle, block) is None:
            break


@settings(max_examples=300, deadline=None)
@given(headers=header_lists, huffman=st.booleans(), data=st.data())
def test_mutated_and_truncated_blocks_decode_like_hpack(headers, huffman, data):
    block = bytearray(hpack.Encoder().encode(headers, huffman=huffman))
    if block:
        for _ in range(data.draw(st.integers(0, 3))):
            block[data.draw(st.integers(0, len(block) - 1))] = data.draw(st.integers(0, 255))
        del block[data.draw(st.integers(0, len(block))):]
    both_decode(*pair(), bytes(block))


# --- the whole-block cache ---
NGINX_BLOCK = bytes.fromhex(  # nginx 1.22's h2c answer: literals with indexing, static names only
    "887689aa6355e580ae212e1f6196df697e94134a693f75040138a00571b7ee01a53168df5f901d75d0620d263d4c1c"
    "892a56426c28e95c023634")


def test_a_repeated_self_contained_block_still_fills_the_table_like_hpack(monkeypatch):
    """nginx sends the same bytes for every response within a second, each time inserting its
    four literals: a cached block must insert (and evict) exactly as a decoded one."""
    monkeypatch.setattr(hpack_decode, "_block_cache", {})
    ours, oracle = pair()
    assert both_decode(ours, oracle, _int(150, 5, 0x20) + b"\x88") is not None  # a small table
    for _ in range(3):
        assert both_decode(ours, oracle, NGINX_BLOCK)[1] == (b"server", b"nginx/1.22.1", False)
        assert NGINX_BLOCK in hpack_decode._block_cache
        assert both_decode(ours, oracle, b"\xbe\xbf") is not None  # the two newest entries
    other = HeaderBlockDecoder()  # another connection: the same block, its own table
    assert fields_of(other.decode(NGINX_BLOCK)) == fields_of(ours.decode(NGINX_BLOCK))
    assert other.decode(b"\xbe") == [(b"content-length", b"64")]


def test_blocks_that_use_the_dynamic_table_are_never_cached(monkeypatch):
    monkeypatch.setattr(hpack_decode, "_block_cache", {})
    ours, oracle = pair()
    for value in (b"b", b"d"):
        both_decode(ours, oracle, b"\x40\x01a\x01" + value)
        assert both_decode(ours, oracle, b"\xbe") == [(b"a", value, False)]  # index 62
        assert both_decode(ours, oracle, b"\x0f\x2f\x01x") == [(b"a", b"x", False)]  # name 62
    assert both_decode(ours, oracle, b"\x3f\xe1\x1f\x88") is not None  # a size update
    assert set(hpack_decode._block_cache) == {b"\x40\x01a\x01b", b"\x40\x01a\x01d"}


def test_a_cached_block_is_still_held_to_each_decoders_header_list_limit(monkeypatch):
    monkeypatch.setattr(hpack_decode, "_block_cache", {})
    assert HeaderBlockDecoder().decode(NGINX_BLOCK)  # cached under the default limit
    assert both_decode(*pair(100), NGINX_BLOCK) is None  # over 100 bytes: rejected from the cache


def test_block_cache_is_bounded_and_skips_long_blocks(monkeypatch):
    monkeypatch.setattr(hpack_decode, "_block_cache", {})
    decoder = HeaderBlockDecoder()
    for n in range(hpack_decode.BLOCK_CACHE_ENTRIES + 10):
        decoder.decode(_literal(b"a", b"%d" % n, 0x00))
        assert len(hpack_decode._block_cache) <= hpack_decode.BLOCK_CACHE_ENTRIES
    hpack_decode._block_cache.clear()
    decoder.decode(_literal(b"a", b"x" * hpack_decode.BLOCK_CACHE_MAX_KEY, 0x00))
    assert not hpack_decode._block_cache


def test_a_repeated_block_that_reads_the_table_decodes_like_hpack_until_the_table_changes():
    """h2load repeats a request head as indices into the dynamic table: the same block again is
    the same fields (and the same decoder generation) only while nothing changed the table."""
    ours, oracle = pair()
    both_decode(ours, oracle, _literal(b"x-a", b"1") + _literal(b"x-b", b"2"))
    # :method GET (static), entry 62, a literal named by entry 63, a never-indexed one by 62
    repeat = b"\x82\xbe\x0f\x30\x013\x1f\x2f\x017"
    first = both_decode(ours, oracle, repeat)
    assert first == [(b":method", b"GET", False), (b"x-b", b"2", False), (b"x-a", b"3", False),
                     (b"x-b", b"7", True)]
    generation = ours.generation
    assert both_decode(ours, oracle, repeat) == first
    assert ours.generation == generation  # decoded again from the last block
    both_decode(ours, oracle, _literal(b"x-c", b"9"))  # an insert: the indices now name others
    assert both_decode(ours, oracle, repeat) == [(b":method", b"GET", False), (b"x-c", b"9", False),
                                                 (b"x-b", b"3", False), (b"x-c", b"7", True)]
    assert ours.generation > generation
    assert both_decode(ours, oracle, repeat)[1] == (b"x-c", b"9", False)
    assert both_decode(ours, oracle, _int(0, 5, 0x20)) == []  # a size update empties the table
    assert both_decode(ours, oracle, repeat) is None  # both reject the indices now
    with pytest.raises(HpackDecodeError, match="failed earlier"):
        ours.decode(b"\x82")


def test_a_repeated_block_is_still_held_to_the_header_list_limit():
    decoder = HeaderBlockDecoder()
    decoder.decode(_literal(b"x-a", b"1" * 60))
    assert decoder.decode(b"\xbe") == [(b"x-a", b"1" * 60)]
    decoder.max_header_list_size = 80  # as h2 sets it: 32 + 3 + 60 is over
    with pytest.raises(HpackDecodeError, match="header list too large"):
        decoder.decode(b"\xbe")
