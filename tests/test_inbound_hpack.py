"""The inbound server's HPACK coder in h2's slots, against `hpack` as the independent oracle.

Encoder: every block must decode with `hpack.Decoder` to the same fields (never-indexed ones still
never-indexed) without ever adding to the client's dynamic table, also when the client shrank
its table to 0. Decoder adapter: same fields as `hpack.Decoder` block after block, and hpack's own
exception types (which h2 maps to connection errors) for oversized and broken blocks.
"""

from __future__ import annotations

import asyncio
import json

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, HPACKError, OversizedHeaderListError
from hypothesis import given, settings
from hypothesis import strategies as st

from grpc_support.h2client import H2TestClient
from sigv4proxy.inbound.h2_hpack import H2HeaderDecoder, ResponseHeaderEncoder
from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy

names = st.one_of(st.sampled_from([b":status", b"content-type", b"server", b"date", b"etag",
                                   b"set-cookie", b"x-amzn-requestid", b"accept-encoding", b"grpc-status"]),
                  st.binary(min_size=1, max_size=40))
values = st.one_of(st.sampled_from([b"", b"200", b"204", b"404", b"500", b"gzip, deflate", b"0"]),
                   st.binary(max_size=60), st.binary(min_size=126, max_size=3000))
fields = st.tuples(names, values, st.booleans())  # (name, value, never indexed)


def build(items):
    return [NeverIndexedHeaderTuple(n, v) if secret else (n, v) for n, v, secret in items]


def seen(decoded):
    return [(bytes(f[0]), bytes(f[1]), not getattr(f, "indexable", True)) for f in decoded]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(fields, max_size=10), min_size=1, max_size=4), st.booleans())
def test_blocks_decode_with_hpack_to_the_same_fields_and_never_touch_its_table(blocks, shrink):
    encoder, oracle = ResponseHeaderEncoder(), hpack.Decoder()
    oracle.max_header_list_size = 1 << 20
    if shrink:  # the client's SETTINGS_HEADER_TABLE_SIZE=0, as h2 passes it on
        oracle.max_allowed_table_size = 0
        encoder.header_table_size = 0
    for items in blocks:
        decoded = oracle.decode(encoder.encode(build(items)), raw=True)
        assert seen(decoded) == [(n, v, secret) for n, v, secret in items]
        assert len(oracle.header_table.dynamic_entries) == 0


def test_static_fields_are_one_byte_and_a_table_change_is_announced_once():
    encoder = ResponseHeaderEncoder()
    assert encoder.encode([(b":status", b"200")]) == b"\x88"  # static entry 8
    assert encoder.encode([HeaderTuple(b":status", b"204")]) == b"\x89"
    encoder.header_table_size = 100
    first, second = encoder.encode([(b":status", b"200")]), encoder.encode([(b":status", b"200")])
    assert first == b"\x20\x88" and second == b"\x88"  # size update to 0, then plain blocks


def test_decoder_matches_hpack_across_blocks_with_a_dynamic_table():
    source = hpack.Encoder()  # indexes, Huffman: exercises the table our decoder must keep
    ours, oracle = H2HeaderDecoder(1 << 20), hpack.Decoder()
    oracle.max_header_list_size = 1 << 20
    blocks = [[(b":method", b"POST"), (b":path", b"/svc/Call"), (b"x-trace", b"abc"),
               NeverIndexedHeaderTuple(b"authorization", b"Bearer t")],
              [(b":method", b"POST"), (b":path", b"/svc/Call"), (b"x-trace", b"abc")],
              [(b"x-trace", b"def"), (b"content-type", b"application/grpc")]]
    for headers in blocks:
        block = source.encode(headers)
        assert seen(ours.decode(block, raw=True)) == seen(oracle.decode(block, raw=True))


def test_decoder_raises_the_hpack_errors_h2_maps_to_connection_errors():
    limited = H2HeaderDecoder(100)
    block = hpack.Encoder().encode([(b"x-big", b"v" * 200)])
    with pytest.raises(OversizedHeaderListError):
        limited.decode(block, raw=True)
    limited.max_header_list_size = 1000  # h2 sets it from our acknowledged SETTINGS
    assert H2HeaderDecoder(1000).decode(block, raw=True) == [(b"x-big", b"v" * 200)]
    for broken in (b"\x80", b"\xff\xff\xff\xff\xff\xff\xff", b"\x3f\xff\xff\xff\x7f"):
        with pytest.raises(HPACKDecodingError) as caught:
            H2HeaderDecoder().decode(broken, raw=True)
        assert isinstance(caught.value, HPACKError)
    small = H2HeaderDecoder()
    small.max_allowed_table_size = 0  # our SETTINGS_HEADER_TABLE_SIZE, were it ever 0
    with pytest.raises(HPACKDecodingError):
        small.decode(b"\x3f\xe1\x1f", raw=True)  # a size update to 4096 above that


async def test_a_client_that_keeps_no_header_table_gets_valid_responses(sim):
    # A client advertising SETTINGS_HEADER_TABLE_SIZE=0: its h2 decoder rejects any block that
    # uses or resizes the dynamic table above 0.
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        client.h2.update_settings({hpack_settings_code(): 0})
        client.flush()
        records = []
        for i in range(3):
            sid = client.request("GET", f"/t{i}", LATTICE_HOST, [("x-n", str(i))])
            records.append(await client.wait(sid))
        await asyncio.sleep(0)
    for i, record in enumerate(records):
        assert record.status == 200 and record.ended
        echo = json.loads(bytes(record.body))
        assert echo["principal"] == PRINCIPAL and echo["path"] == f"/t{i}"


def hpack_settings_code() -> int:
    from h2.settings import SettingCodes

    return SettingCodes.HEADER_TABLE_SIZE
