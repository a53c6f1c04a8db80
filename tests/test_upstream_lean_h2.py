"""What is specific to the lean HTTP/2 client (`LeanH2Connection`), against a raw-frame peer.

The shared behaviour (flow control, GOAWAY, REFUSED_STREAM, timeouts, TLS...) is tested for both
implementations in test_upstream_http2.py / test_upstream_tls.py. Here a scripted loopback peer
reads our frames with `hyperframe` and our header blocks with `hpack.Decoder` (independent
parsers: the oracles) and writes exactly the frames a test needs, including broken ones.
"""

from __future__ import annotations

import asyncio
import struct

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sigv4proxy.errors import (
    BadRequest,
    RetryableStreamError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
)
from sigv4proxy.wire import h2_wire
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.lean_h2 import LeanH2Connection
from support.wire_spy import RecordingTransport, frames_in

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TOKEN = (b"IQoJb3JpZ2luX2VjEXAMPLE/+=" * 40)[:1000]
SIGNED_HEADERS = [
    (b"x-amz-date", b"20261123T104149Z"),
    (b"x-amz-security-token", TOKEN),
    (b"authorization", b"AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20261123/us-west-2/"
                       b"vpc-lattice-svcs/aws4_request, SignedHeaders=host;x-amz-date, "
                       b"Signature=" + b"ab" * 32),
    (b"x-amz-content-sha256", b"UNSIGNED-PAYLOAD"),
    (b"content-type", b"application/json"),  # name in the static table
    (b"x-custom", b""),  # empty value
    (b"x-custom", b"second"),  # repeated name, order kept
]
FRAME_TIMEOUT = 5.0


class PeerConnection:
    """The server side of one connection, driven frame by frame by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = hpack.Decoder()  # for our request header blocks
        self.encoder = hpack.Encoder()  # for the responses

    async def next_frame(self, timeout: float = FRAME_TIMEOUT) -> Frame:
        header = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        frame, length = Frame.parse_frame_header(memoryview(header))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        frame.parse_body(memoryview(body))
        return frame

    async def next_of(self, *types: type, timeout: float = FRAME_TIMEOUT) -> Frame:
        """The next frame of one of `types`, skipping others (bounded)."""
        for _ in range(10_000):
            frame = await self.next_frame(timeout)
            if isinstance(frame, types):
                return frame
        raise AssertionError("too many frames without the expected one")

    async def request_block(self) -> tuple[int, bytes, list[Frame]]:
        """Reads HEADERS (+ CONTINUATION) of the next request: stream id, raw block, the frames."""
        first = await self.next_of(HeadersFrame)
        frames = [first]
        while "END_HEADERS" not in frames[-1].flags:
            frame = await self.next_frame()
            assert isinstance(frame, ContinuationFrame) and frame.stream_id == first.stream_id
            frames.append(frame)
        return first.stream_id, b"".join(f.data for f in frames), frames

    def send(self, *frames: Frame | bytes) -> None:
        self.writer.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    async def handshake(self, peer_settings: dict[int, int] | None = None) -> SettingsFrame:
        preface = await asyncio.wait_for(self.reader.readexactly(len(PREFACE)), FRAME_TIMEOUT)
        assert preface == PREFACE
        client_settings = await self.next_frame()
        assert isinstance(client_settings, SettingsFrame) and "ACK" not in client_settings.flags
        self.send(SettingsFrame(0, peer_settings or {}), SettingsFrame(0, flags=["ACK"]))
        return client_settings

    def respond(self, stream_id: int, headers: list[tuple[bytes, bytes]] | None = None,
                body: bytes = b"ok") -> None:
        block = self.encoder.encode(headers or [(b":status", b"200")])
        self.send(HeadersFrame(stream_id, block, flags=["END_HEADERS"]),
                  DataFrame(stream_id, body, flags=["END_STREAM"]))


class RawPeer:
    """`async with RawPeer() as peer:` a loopback listener handing each connection to the test."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._accepted: asyncio.Queue[PeerConnection] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawPeer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self._accepted.put(PeerConnection(reader, writer))

    async def accept(self) -> PeerConnection:
        return await asyncio.wait_for(self._accepted.get(), FRAME_TIMEOUT)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.wait_for(self._server.wait_closed(), 5)


@pytest.fixture
async def peer():
    async with RawPeer() as raw_peer:
        yield raw_peer


@pytest.fixture
async def connect(peer):
    """connect(peer_settings) -> (LeanH2Connection, PeerConnection), ready; closed afterwards."""
    opened: list[LeanH2Connection] = []

    async def make(peer_settings: dict[int, int] | None = None,
                   timeouts: Timeouts = Timeouts()) -> tuple[LeanH2Connection, PeerConnection]:
        origin = Origin("http", "127.0.0.1", peer.port, "h2")
        conn = LeanH2Connection(origin, timeouts, lambda conn: None)
        opened.append(conn)
        await asyncio.get_running_loop().create_connection(lambda: conn, "127.0.0.1", peer.port)
        server_side = await peer.accept()
        await server_side.handshake(peer_settings)
        await conn.wait_ready(FRAME_TIMEOUT)
        return conn, server_side

    yield make
    for conn in opened:
        conn.close()


def start(conn: LeanH2Connection, headers=(), body=None, method=b"GET", target=b"/p?q=1"):
    request = conn.handle_request(method, target, b"svc.example", list(headers), body)
    return asyncio.create_task(request)


# --- HPACK output ---
def test_header_block_decodes_to_exactly_the_fields_never_indexed_and_unhuffmaned():
    encoder = h2_wire.RequestHeaderEncoder("https")
    block = encoder.encode(b"POST", b"/a/b?x=1", b"svc.example:8443", SIGNED_HEADERS)
    decoder = hpack.Decoder()
    fields = decoder.decode(block, raw=True)
    expected = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"svc.example:8443"),
                (b":path", b"/a/b?x=1"), *SIGNED_HEADERS]
    assert [tuple(f) for f in fields] == expected
    # static-table entries are indexed; every literal is never-indexed (RFC 7541 §6.2.3)
    assert [f.indexable for f in fields[:2]] == [True, True]
    assert all(isinstance(f, hpack.NeverIndexedHeaderTuple) for f in fields[2:])
    assert len(decoder.header_table.dynamic_entries) == 0  # we never insert
    assert TOKEN in block and b"Signature=" + b"ab" * 32 in block  # no Huffman coding


def test_header_block_lowercases_names_and_uses_static_entries():
    encoder = h2_wire.RequestHeaderEncoder("http")
    block = encoder.encode(b"GET", b"/", b"h", [(b"Content-Type", b"A/B"), (b"X-Up", b"V")])
    assert block[:2] == b"\x82\x86"  # :method GET, :scheme http (static 2 and 6)
    assert block.endswith(b"\x01V")  # the last value: a 1-byte raw literal, no Huffman
    fields = hpack.Decoder().decode(block, raw=True)
    assert [tuple(f) for f in fields] == [(b":method", b"GET"), (b":scheme", b"http"),
                                          (b":authority", b"h"), (b":path", b"/"),
                                          (b"content-type", b"A/B"), (b"x-up", b"V")]


_names = st.from_regex(rb"\A[a-z0-9][a-z0-9\-_.]{0,40}\Z")
_values = st.binary(max_size=5000).filter(lambda v: not any(c in v for c in b"\r\n\x00"))


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PATCH"]),
       target=st.from_regex(rb"\A/[!-~]{0,300}\Z"),
       headers=st.lists(st.tuples(_names, _values), max_size=12))
def test_header_blocks_roundtrip_through_hpack_decoder(method, target, headers):
    block = h2_wire.RequestHeaderEncoder("http").encode(method, target, b"a.example", headers)
    fields = hpack.Decoder(max_header_list_size=1 << 20).decode(block, raw=True)
    assert [tuple(f) for f in fields] == [(b":method", method), (b":scheme", b"http"),
                                          (b":authority", b"a.example"), (b":path", target),
                                          *headers]


def test_bad_request_fields_are_refused_without_quoting_them():
    encoder = h2_wire.RequestHeaderEncoder("http")
    for target, headers in [(b"/", [(b"x", b"secret\r\nx: 1")]), (b"/secret\n", []),
                            (b"/", [(b"x:secret", b"v")]), (b"/a b", [])]:
        with pytest.raises(BadRequest) as caught:
            encoder.encode(b"GET", target, b"h", headers)
        assert "secret" not in str(caught.value)


# --- HEADERS on the wire ---
async def test_request_headers_arrive_in_one_frame_with_small_body_coalesced(connect):
    conn, server = await connect()
    task = start(conn, SIGNED_HEADERS, b"payload", method=b"POST")
    stream_id, block, frames = await server.request_block()
    assert [tuple(f) for f in server.decoder.decode(block, raw=True)][4:] == SIGNED_HEADERS
    assert len(frames) == 1 and "END_STREAM" not in frames[0].flags
    data = await server.next_of(DataFrame)
    assert data.data == b"payload" and "END_STREAM" in data.flags
    server.respond(stream_id, [(b":status", b"201"), (b"x-r", b"1")], b"done")
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert response.status == 201 and response.headers == [(b"x-r", b"1")]
    assert await response.read() == b"done"


async def test_streams_started_in_one_pass_share_one_send_and_keep_frame_order(connect):
    # Under load many requests start in one loop pass: their HEADERS (and small bodies) go out
    # in one send, while a streamed body's DATA still follows its own HEADERS.
    conn, server = await connect()
    first = start(conn)  # with a stream in flight, new streams' frames are queued
    first_id, _, _ = await server.request_block()
    conn._transport = spy = RecordingTransport(conn._transport)
    writes = spy.writes

    async def streamed(i: int):
        yield b"streamed-%d-a" % i
        await asyncio.sleep(0)
        yield b"streamed-%d-b" % i

    expected: dict[int, bytes] = {}
    tasks = []
    for i in range(9):
        kind = i % 3
        body = b"inline-%d" % i if kind == 0 else streamed(i) if kind == 1 else None
        tasks.append(start(conn, body=body, method=b"GET" if body is None else b"POST"))
        sent = {0: b"inline-%d" % i, 1: b"streamed-%d-astreamed-%d-b" % (i, i), 2: b""}
        expected[first_id + 2 * (i + 1)] = sent[kind]
    for _ in range(100):
        if writes:
            break
        await asyncio.sleep(0)
    types = [frame_type for frame_type, _ in frames_in(writes[0])]
    assert types.count(h2_wire.HEADERS) == 9

    headers_seen: list[int] = []
    bodies = {sid: b"" for sid in expected}
    ended: set[int] = set()
    for _ in range(200):
        if len(ended) == len(expected):
            break
        frame = await server.next_frame()
        if isinstance(frame, HeadersFrame):
            headers_seen.append(frame.stream_id)
            if "END_STREAM" in frame.flags:
                ended.add(frame.stream_id)
        elif isinstance(frame, DataFrame):
            assert frame.stream_id in headers_seen  # never DATA before its stream's HEADERS
            bodies[frame.stream_id] += frame.data
            if "END_STREAM" in frame.flags:
                ended.add(frame.stream_id)
    assert headers_seen == sorted(expected) and ended == set(expected)
    assert bodies == expected
    for sid in [first_id, *expected]:
        server.respond(sid)
    for task in [first, *tasks]:
        response = await asyncio.wait_for(task, FRAME_TIMEOUT)
        assert await response.read() == b"ok"


async def test_connection_window_goes_to_waiting_uploads_in_turn(connect):
    # Every opening of the connection window used to wake all waiting uploads and whichever ran
    # first took it: under steady upload load one request could wait as long as the load lasted
    # (the soak's 30 s client timeouts). Now the uploads take turns, in the order they waited.
    conn, server = await connect({SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20})

    async def body(size: int):
        yield b"u" * size

    first = start(conn, body=body(100_000), method=b"POST")
    first_id, _, _ = await server.request_block()
    taken = 0
    while taken < 65_535:  # the initial connection window, all of it to the first upload
        frame = await server.next_of(DataFrame)
        assert frame.stream_id == first_id
        taken += len(frame.data)
    others = []
    for _ in range(2):  # queued behind the first, in this order
        others.append(start(conn, body=body(30_000), method=b"POST"))
        await server.request_block()
        await asyncio.sleep(0.05)
    second_id, third_id = first_id + 2, first_id + 4

    owners = []
    for _ in range(4):
        server.send(WindowUpdateFrame(0, window_increment=10_000))
        got, ids = 0, set()
        while got < 10_000:
            frame = await server.next_of(DataFrame)
            got += len(frame.data)
            ids.add(frame.stream_id)
        assert got == 10_000 and len(ids) == 1
        owners.append(ids.pop())
    assert owners == [first_id, second_id, third_id, first_id]

    server.send(WindowUpdateFrame(0, window_increment=1 << 20))
    ended = set()
    for _ in range(200):
        if len(ended) == 3:
            break
        frame = await server.next_of(DataFrame)
        if "END_STREAM" in frame.flags:
            ended.add(frame.stream_id)
    assert ended == {first_id, second_id, third_id}
    for sid in sorted(ended):
        server.respond(sid)
    for task in [first, *others]:
        response = await asyncio.wait_for(task, FRAME_TIMEOUT)
        assert await response.read() == b"ok"


@pytest.mark.parametrize("peer_max_frame", [16384, 20000])
async def test_40_kib_header_block_is_split_into_continuation_frames(connect, peer_max_frame):
    conn, server = await connect({h2_wire.SETTINGS_MAX_FRAME_SIZE: peer_max_frame})
    big = [(b"x-big", bytes(range(32, 127)) * 431)]  # ~40 KiB value
    task = start(conn, big)
    stream_id, block, frames = await server.request_block()
    assert len(block) > 40_000
    assert isinstance(frames[0], HeadersFrame) and "END_STREAM" in frames[0].flags
    assert all(isinstance(f, ContinuationFrame) for f in frames[1:]) and len(frames) >= 3
    assert all(len(f.data) <= peer_max_frame for f in frames)
    assert [("END_HEADERS" in f.flags) for f in frames] == [False] * (len(frames) - 1) + [True]
    assert [tuple(f) for f in server.decoder.decode(block, raw=True)][4:] == big
    server.respond(stream_id)
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert response.status == 200 and await response.read() == b"ok"


async def test_peer_header_table_size_change_is_acknowledged_with_a_size_update(connect):
    conn, server = await connect({h2_wire.SETTINGS_HEADER_TABLE_SIZE: 0})
    server.decoder.max_allowed_table_size = 0
    task = start(conn, [(b"x-a", b"1")])
    stream_id, block, _ = await server.request_block()
    assert block[:1] == b"\x20"  # dynamic table size update to 0, first in the block
    assert [tuple(f) for f in server.decoder.decode(block, raw=True)][4:] == [(b"x-a", b"1")]
    server.respond(stream_id)
    assert (await asyncio.wait_for(task, FRAME_TIMEOUT)).status == 200


# --- responses ---
async def test_padded_prioritised_response_headers_in_continuations_and_padded_data(connect):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    block = server.encoder.encode([(b":status", b"200"), (b"x-long", b"v" * 30000),
                                   (b"content-length", b"5")])
    headers = HeadersFrame(stream_id, block[:10000], flags=["PADDED", "PRIORITY"])
    headers.pad_length, headers.depends_on, headers.stream_weight = 7, 0, 15
    data = DataFrame(stream_id, b"hello", flags=["PADDED", "END_STREAM"])
    data.pad_length = 20
    server.send(headers, ContinuationFrame(stream_id, block[10000:20000]),
                ContinuationFrame(stream_id, block[20000:], flags=["END_HEADERS"]), data)
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert response.headers == [(b"x-long", b"v" * 30000), (b"content-length", b"5")]
    assert await response.read() == b"hello"


async def test_unknown_frames_and_priority_are_ignored_and_ping_is_answered(connect):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    unknown = struct.pack(">BHBBL", 0, 4, 0xFA, 0x0, stream_id) + b"\x00\x01\x02\x03"
    server.send(unknown, PriorityFrame(stream_id, depends_on=0, stream_weight=200),
                PingFrame(0, b"8bytes!!"))
    ack = await server.next_of(PingFrame)
    assert "ACK" in ack.flags and ack.opaque_data == b"8bytes!!"
    server.respond(stream_id)
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert await response.read() == b"ok"


@pytest.mark.parametrize("field", [(b"X-Upper", b"1"), (b"content-length", b"9" * 5000)],
                         ids=["upper_case_name", "content_length_too_long_for_int"])
async def test_malformed_response_header_resets_only_that_stream(connect, field):
    conn, server = await connect()
    bad = start(conn)
    bad_id, _, _ = await server.request_block()
    server.respond(bad_id, [(b":status", b"200"), field])
    with pytest.raises(UpstreamProtocolError):
        await asyncio.wait_for(bad, FRAME_TIMEOUT)
    reset = await server.next_of(RstStreamFrame)
    assert reset.stream_id == bad_id and reset.error_code == h2_wire.PROTOCOL_ERROR
    good = start(conn)
    good_id, _, _ = await server.request_block()
    server.respond(good_id)
    assert (await asyncio.wait_for(good, FRAME_TIMEOUT)).status == 200


async def test_body_longer_than_content_length_is_a_stream_error(connect):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.respond(stream_id, [(b":status", b"200"), (b"content-length", b"2")], b"three")
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    with pytest.raises(UpstreamProtocolError):
        await asyncio.wait_for(response.read(), FRAME_TIMEOUT)


@pytest.mark.parametrize("frame,code", [
    (lambda sid: PushPromiseFrame(sid, promised_stream_id=2, data=b"\x82",
                                  flags=["END_HEADERS"]), h2_wire.PROTOCOL_ERROR),
    (lambda sid: DataFrame(sid, b"x" * 16385), h2_wire.FRAME_SIZE_ERROR),
    (lambda sid: HeadersFrame(sid, b"\xff\xff\xff\xff\x0f", flags=["END_HEADERS"]),
     h2_wire.COMPRESSION_ERROR),
    (lambda sid: HeadersFrame(sid + 2, b"\x88", flags=["END_HEADERS"]), h2_wire.PROTOCOL_ERROR),
    (lambda sid: WindowUpdateFrame(0, 0), h2_wire.PROTOCOL_ERROR),
    (lambda sid: struct.pack(">BHBBL", 0, 8, 0x6, 0, sid) + b"8bytes!!", h2_wire.PROTOCOL_ERROR),
    (lambda sid: HeadersFrame(sid, b"\x88"), h2_wire.PROTOCOL_ERROR),  # then no CONTINUATION:
], ids=["push_promise", "oversized", "hpack_garbage", "idle_stream", "zero_window_update",
        "ping_on_stream", "interrupted_header_block"])
async def test_protocol_errors_send_goaway_and_fail_with_a_typed_error(connect, frame, code):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(frame(stream_id), PingFrame(0, b"followup"))  # the ping interrupts a header block
    goaway = await server.next_of(GoAwayFrame)
    assert goaway.error_code == code and goaway.last_stream_id == 0
    with pytest.raises(UpstreamProtocolError) as caught:
        await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert caught.value.status == 502
    assert conn.is_closed() and not conn.is_available()


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame as bytes, whatever it carries (hyperframe refuses to build the bad ones)."""
    return struct.pack(">BHBBL", 0, len(payload), frame_type, flags, stream_id) + payload


# The connection-level frame rules (RFC 9113 §6.5, §6.7-§6.9) on the client's side, each from a
# peer mid-request: a connection error, GOAWAY with its code, the request failed with a typed error.
@pytest.mark.parametrize("frame,code", [
    (raw_frame(0x4, 0, 0, struct.pack(">HL", 0x2, 1)), h2_wire.PROTOCOL_ERROR),  # a server enables push
    (raw_frame(0x4, 0, 0, struct.pack(">HL", 0x4, 1 << 31)), h2_wire.FLOW_CONTROL_ERROR),
    (raw_frame(0x4, 0, 0, struct.pack(">HL", 0x5, 16383)), h2_wire.PROTOCOL_ERROR),
    (raw_frame(0x4, 0, 0, struct.pack(">HL", 0x5, 1 << 24)), h2_wire.PROTOCOL_ERROR),
    (raw_frame(0x4, 0, 1, b""), h2_wire.PROTOCOL_ERROR),
    (raw_frame(0x4, 0x1, 0, struct.pack(">HL", 0x4, 1)), h2_wire.FRAME_SIZE_ERROR),
    (raw_frame(0x4, 0, 0, b"\x00\x04\x00\x00\x00"), h2_wire.FRAME_SIZE_ERROR),
    (raw_frame(0x6, 0, 0, b"7bytes!"), h2_wire.FRAME_SIZE_ERROR),
    (raw_frame(0x8, 0, 0, b"\x00\x01\x00"), h2_wire.FRAME_SIZE_ERROR),
    (raw_frame(0x8, 0, 0, struct.pack(">L", (1 << 31) - 1)), h2_wire.FLOW_CONTROL_ERROR),
    (raw_frame(0x7, 0, 0, b"\x00" * 7), h2_wire.FRAME_SIZE_ERROR),
    (raw_frame(0x7, 0, 1, b"\x00" * 8), h2_wire.PROTOCOL_ERROR),
], ids=["enable_push", "initial_window_too_large", "max_frame_too_small", "max_frame_too_large",
        "settings_on_stream", "settings_ack_with_payload", "settings_bad_length", "ping_bad_length",
        "window_update_bad_length", "connection_window_overflow", "goaway_bad_length", "goaway_on_stream"])
async def test_bad_connection_frames_send_goaway_with_their_code(connect, frame, code):
    conn, server = await connect()
    task = start(conn)
    await server.request_block()
    server.send(frame)
    goaway = await server.next_of(GoAwayFrame)
    assert goaway.error_code == code and goaway.last_stream_id == 0
    with pytest.raises(UpstreamProtocolError):
        await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert conn.is_closed()


async def test_a_first_frame_other_than_settings_ends_the_connection(peer):
    origin = Origin("http", "127.0.0.1", peer.port, "h2")
    conn = LeanH2Connection(origin, Timeouts(), lambda conn: None)
    await asyncio.get_running_loop().create_connection(lambda: conn, "127.0.0.1", peer.port)
    try:
        server = await peer.accept()
        await asyncio.wait_for(server.reader.readexactly(len(PREFACE)), FRAME_TIMEOUT)
        server.send(PingFrame(0, b"12345678"), SettingsFrame(0, {}))
        goaway = await server.next_of(GoAwayFrame)
        assert goaway.error_code == h2_wire.PROTOCOL_ERROR
        with pytest.raises(UpstreamConnectError):
            await conn.wait_ready(FRAME_TIMEOUT)
        assert conn.is_closed()
    finally:
        conn.close()


@pytest.mark.parametrize("increment,code", [(0, h2_wire.PROTOCOL_ERROR), ((1 << 31) - 1, h2_wire.FLOW_CONTROL_ERROR)],
                         ids=["zero", "overflow"])
async def test_a_bad_stream_window_update_resets_only_that_stream(connect, increment, code):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(raw_frame(0x8, 0, stream_id, struct.pack(">L", increment)))
    reset = await server.next_of(RstStreamFrame)
    assert reset.stream_id == stream_id and reset.error_code == code
    with pytest.raises(UpstreamProtocolError):
        await asyncio.wait_for(task, FRAME_TIMEOUT)
    assert not conn.is_closed() and conn.is_available()
    again = start(conn)  # the connection still serves
    next_id, _, _ = await server.request_block()
    server.respond(next_id)
    response = await asyncio.wait_for(again, FRAME_TIMEOUT)
    assert response.status == 200


# --- flow control ---
async def test_send_window_goes_negative_after_settings_change_and_recovers(connect):
    conn, server = await connect()
    size = 100_000
    body_sent = asyncio.Event()

    async def body():
        yield b"a" * size
        body_sent.set()

    task = start(conn, [], body(), method=b"POST")
    stream_id, _, _ = await server.request_block()
    received = 0
    while received < 65535:  # default windows: 65535 bytes, then the client must stop
        received += len((await server.next_of(DataFrame)).data)
    assert received == 65535
    server.send(SettingsFrame(0, {h2_wire.SETTINGS_INITIAL_WINDOW_SIZE: 16384}),
                WindowUpdateFrame(0, 1 << 20))  # the connection is open; the stream is at -49151
    ack = await server.next_of(SettingsFrame)
    assert "ACK" in ack.flags
    server.send(WindowUpdateFrame(stream_id, 49151))  # back to exactly 0: still nothing to send
    with pytest.raises(TimeoutError):
        await server.next_of(DataFrame, timeout=0.3)
    server.send(WindowUpdateFrame(stream_id, 1000))
    assert len((await server.next_of(DataFrame)).data) == 1000
    server.send(WindowUpdateFrame(stream_id, 1 << 20))
    rest, ended = 0, False
    for _ in range(100):
        frame = await server.next_of(DataFrame)
        rest += len(frame.data)
        if "END_STREAM" in frame.flags:
            ended = True
            break
    assert ended and received + 1000 + rest == size
    assert body_sent.is_set()
    server.respond(stream_id)
    assert (await asyncio.wait_for(task, FRAME_TIMEOUT)).status == 200


async def test_receive_credit_comes_back_only_as_the_consumer_reads(connect):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(HeadersFrame(stream_id, server.encoder.encode([(b":status", b"200")]),
                             flags=["END_HEADERS"]))
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    chunk = b"z" * 16384
    server.send(*[DataFrame(stream_id, chunk) for _ in range(64)])  # exactly the 1 MiB window
    stream_updates = []

    async def collect(timeout: float) -> None:
        try:
            while True:
                frame = await server.next_of(WindowUpdateFrame, timeout=timeout)
                if frame.stream_id == stream_id:
                    stream_updates.append(frame.window_increment)
        except TimeoutError:
            pass

    await collect(0.3)
    assert stream_updates == []  # nothing read yet: no credit back
    reader = response.__aiter__()
    for _ in range(64):
        assert await asyncio.wait_for(reader.__anext__(), FRAME_TIMEOUT) == chunk
    await collect(0.3)
    assert sum(stream_updates) >= 768 * 1024  # credit for what was read (batched)
    server.send(DataFrame(stream_id, b"end", flags=["END_STREAM"]))
    assert await asyncio.wait_for(reader.__anext__(), FRAME_TIMEOUT) == b"end"


async def test_stream_window_overrun_resets_the_stream(connect):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(HeadersFrame(stream_id, server.encoder.encode([(b":status", b"200")]),
                             flags=["END_HEADERS"]))
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    server.send(*[DataFrame(stream_id, b"z" * 16384) for _ in range(65)])  # 16 KiB too many
    reset = await server.next_of(RstStreamFrame)
    assert reset.stream_id == stream_id and reset.error_code == h2_wire.FLOW_CONTROL_ERROR
    with pytest.raises(UpstreamProtocolError):
        for _ in range(100):
            if not await asyncio.wait_for(response.__aiter__().__anext__(), FRAME_TIMEOUT):
                break
    assert not conn.is_closed()


# --- GOAWAY / RST_STREAM ---
async def test_goaway_fails_streams_above_last_id_and_lets_the_rest_finish(connect):
    conn, server = await connect()
    first, second = start(conn), None
    first_id, _, _ = await server.request_block()
    second = start(conn)
    second_id, _, _ = await server.request_block()
    server.send(GoAwayFrame(0, last_stream_id=first_id, error_code=0))
    with pytest.raises(RetryableStreamError):
        await asyncio.wait_for(second, FRAME_TIMEOUT)
    assert not conn.is_available() and not conn.is_closed()
    server.respond(first_id, body=b"finished")
    response = await asyncio.wait_for(first, FRAME_TIMEOUT)
    assert await response.read() == b"finished"
    assert await asyncio.wait_for(server.reader.read(), FRAME_TIMEOUT) == b""  # then it closes
    assert second_id > first_id


async def test_rst_stream_mid_body_fails_the_body_with_reset(connect):
    conn, server = await connect()
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(HeadersFrame(stream_id, server.encoder.encode([(b":status", b"200")]),
                             flags=["END_HEADERS"]),
                DataFrame(stream_id, b"partial"), RstStreamFrame(stream_id, 0x2))
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    reader = response.__aiter__()
    assert await reader.__anext__() == b"partial"
    with pytest.raises(UpstreamReset) as caught:
        await reader.__anext__()
    assert "INTERNAL_ERROR" in caught.value.reason
    assert conn.is_available()


# --- response heads repeated byte for byte (the check is cached per self-contained block) ---
def _never_indexed(name: bytes, value: bytes) -> bytes:
    return b"\x10" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _indexed_insert(name: bytes, value: bytes) -> bytes:
    return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value


async def _exchange(conn, server, block: bytes, body: bytes = b"ok"):
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(HeadersFrame(stream_id, block, flags=["END_HEADERS"]),
                DataFrame(stream_id, body, flags=["END_STREAM"]))
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    await response.read()
    return response


async def test_a_repeated_head_gives_each_stream_its_own_fields(connect):
    conn, server = await connect()
    block = b"\x88" + _never_indexed(b"x-a", b"1") + _never_indexed(b"content-length", b"2")
    first = await _exchange(conn, server, block)
    first.headers.append((b"x-added", b"by a consumer"))
    other_conn, other_server = await connect()
    for c, s in ((conn, server), (other_conn, other_server)):
        again = await _exchange(c, s, block)
        assert again.status == 200
        assert again.headers == [(b"x-a", b"1"), (b"content-length", b"2")]


async def test_a_head_that_refers_to_the_dynamic_table_is_read_against_each_table(connect):
    """The same bytes (:status 200, dynamic entry 62) mean x-a: 1 on one connection, x-b: 2 on
    the other: nothing derived from them may be shared."""
    for name, value in ((b"x-a", b"1"), (b"x-b", b"2")):
        conn, server = await connect()
        await _exchange(conn, server, b"\x88" + _indexed_insert(name, value))
        response = await _exchange(conn, server, b"\x88\xbe")
        assert response.headers == [(name, value)]


async def test_a_refused_head_is_refused_every_time(connect):
    conn, server = await connect()
    block = b"\x88" + _never_indexed(b"X-Upper", b"1")
    for _ in range(2):
        task = start(conn)
        stream_id, _, _ = await server.request_block()
        server.send(HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]))
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(task, FRAME_TIMEOUT)
        reset = await server.next_of(RstStreamFrame)
        assert reset.stream_id == stream_id and reset.error_code == h2_wire.PROTOCOL_ERROR


async def test_a_block_accepted_as_a_head_is_still_checked_as_trailers(connect):
    """Trailers may carry no pseudo-header: a head's block (with :status) sent again as trailers
    is a stream error even though the same bytes passed as a head a moment before."""
    conn, server = await connect()
    head = b"\x88" + _never_indexed(b"x-a", b"1")
    await _exchange(conn, server, head)
    task = start(conn)
    stream_id, _, _ = await server.request_block()
    server.send(HeadersFrame(stream_id, head, flags=["END_HEADERS"]), DataFrame(stream_id, b"ok"),
                HeadersFrame(stream_id, head, flags=["END_HEADERS", "END_STREAM"]))
    response = await asyncio.wait_for(task, FRAME_TIMEOUT)
    with pytest.raises(UpstreamProtocolError):
        await asyncio.wait_for(response.read(), FRAME_TIMEOUT)
    reset = await server.next_of(RstStreamFrame)
    assert reset.stream_id == stream_id and reset.error_code == h2_wire.PROTOCOL_ERROR
