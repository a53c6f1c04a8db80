"""Frame-level rules of the inbound HTTP/2 server (RFC 9113), over a raw loopback socket: frames
built by hand (`hyperframe` cannot build the broken ones), header blocks encoded and decoded by the
`hpack` library (the oracle), a real proxy in front of the simulator, which verifies the signature
of every request that reaches it.

Both servers (`--h2-server-implementation lean|h2`) must pass: `make test` runs this module under
each. Where the `h2` reference answers otherwise (a connection error where RFC 9113 asks for, or
allows, a stream error: a bad PRIORITY, a zero stream WINDOW_UPDATE, too many streams, DATA after
END_STREAM), the test says which answer each one gives.
"""

from __future__ import annotations

import asyncio
import json
import struct

import hpack
import pytest

from support.polling import eventually
from support.proxy import H2_SERVER_IMPLEMENTATION, LATTICE_HOST, PRINCIPAL, h2_server_class, running_proxy
from support.wire_spy import split_frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x7, 0xB
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5
LEAN = H2_SERVER_IMPLEMENTATION == "lean"


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((frame_type, flags)) + stream_id.to_bytes(4, "big") + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


class RawClient:
    """One h2c connection driven frame by frame; every frame the server sends is kept in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.frames: list[tuple[int, int, int, bytes]] = []  # (type, flags, stream id, payload)
        self.closed = asyncio.Event()
        self._buffer = b""

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.writer.close()

    def start(self, *pairs: tuple[int, int]) -> None:
        self.send(PREFACE + settings(*pairs))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def block(self, path: str, method: str = "GET", extra=()) -> bytes:
        return self.encoder.encode([(":method", method), (":scheme", "http"), (":authority", LATTICE_HOST),
                                    (":path", path), *extra])

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self._buffer += data
                for each in split_frames(self._buffer):
                    if len(each[3]) < int.from_bytes(self._buffer[:3], "big"):
                        break  # the last frame is not whole yet
                    self.frames.append(each)
                    self._buffer = self._buffer[9 + len(each[3]):]
        finally:
            self.closed.set()

    def of(self, frame_type: int, stream_id: int | None = None) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames if f[0] == frame_type and (stream_id is None or f[2] == stream_id)]

    def goaway_code(self) -> int | None:
        goaways = self.of(GOAWAY)
        return int.from_bytes(goaways[-1][3][4:8], "big") if goaways else None

    def reset_code(self, stream_id: int) -> int | None:
        resets = self.of(RST_STREAM, stream_id)
        return int.from_bytes(resets[-1][3], "big") if resets else None

    def ended(self, stream_id: int) -> bool:
        return any(f[1] & END_STREAM for f in self.frames if f[2] == stream_id and f[0] in (HEADERS, DATA))

    def response(self, stream_id: int) -> tuple[dict[bytes, bytes], bytes]:
        """The head and body of a complete answer (the server's blocks decoded in arrival order)."""
        head: dict[bytes, bytes] = {}
        body = b""
        for frame_type, _, sid, payload in self.frames:
            if frame_type == HEADERS:
                fields = self.decoder.decode(payload, raw=True)  # every block: the table stays in step
                if sid == stream_id and not head:
                    head = dict(fields)
            elif frame_type == DATA and sid == stream_id:
                body += payload
        return head, body

    async def answered(self, stream_id: int) -> tuple[dict[bytes, bytes], bytes]:
        assert await eventually(lambda: self.ended(stream_id) or self.closed.is_set(), timeout=10)
        return self.response(stream_id)

    async def connection_error(self) -> int | None:
        await asyncio.wait_for(self.closed.wait(), 10)
        return self.goaway_code()


def verified(head: dict[bytes, bytes], body: bytes, path: str) -> dict:
    assert head.get(b":status") == b"200", head
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL and echo["path"] == path  # the simulator checked the signature
    return echo


@pytest.fixture
async def proxy(sim):
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as app:
        yield app


async def test_settings_are_acknowledged_and_ping_answered(proxy):
    async with RawClient(proxy.port) as client:
        client.start()
        client.send(frame(PING, 0, 0, b"12345678"))
        assert await eventually(lambda: client.of(PING) and client.of(SETTINGS))
        ours = [f for f in client.of(SETTINGS) if not f[1] & ACK][0]
        announced = dict(struct.unpack(">HL", ours[3][i:i + 6]) for i in range(0, len(ours[3]), 6))
        assert announced[0x3] == 256 and announced[INITIAL_WINDOW_SIZE] == 256 << 10 and announced[0x2] == 0
        assert await eventually(lambda: any(f[1] & ACK for f in client.of(SETTINGS)))
        assert client.of(PING)[0][1] & ACK and client.of(PING)[0][3] == b"12345678"
        assert client.of(WINDOW_UPDATE, 0)  # the connection window opened past 64 KiB


async def test_a_first_frame_other_than_settings_ends_the_connection(proxy):
    if not LEAN:
        pytest.skip("the h2 reference does not check that SETTINGS follows the preface (RFC 9113 §3.4)")
    async with RawClient(proxy.port) as client:
        client.send(PREFACE + frame(PING, 0, 0, b"x" * 8)
                    + frame(HEADERS, END_STREAM | END_HEADERS, 1, client.block("/never")))
        assert await client.connection_error() == PROTOCOL_ERROR
        assert not client.of(HEADERS)


async def test_a_bad_preface_ends_the_connection():
    # (the proxy port sends anything but the preface to HTTP/1.1: a server of its own sees it)
    async def handler(stream):
        raise AssertionError("no stream may start")

    server = await asyncio.get_running_loop().create_server(lambda: h2_server_class()(handler), "127.0.0.1", 0)
    try:
        async with RawClient(server.sockets[0].getsockname()[1]) as client:
            client.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + settings()
                        + frame(HEADERS, END_STREAM | END_HEADERS, 1, client.block("/never")))
            code = await client.connection_error()
        assert not client.of(HEADERS)
        assert code == PROTOCOL_ERROR or (code is None and not LEAN)  # h2 closes without GOAWAY (§3.4 allows)
    finally:
        server.close()
        await server.wait_closed()


async def test_padding_priority_continuation_and_unknown_frames_carry_a_request_through(proxy):
    body = bytes(range(256)) * 20
    async with RawClient(proxy.port) as client:
        client.start()
        block = client.block("/padded", "POST", [("content-length", str(len(body))), ("x-pad", "v" * 300)])
        # HEADERS padded and with a priority, the block split over two CONTINUATIONs, then an
        # unknown frame type, a PRIORITY frame for another stream, and DATA padded in two frames
        cut1, cut2 = len(block) // 3, 2 * len(block) // 3
        client.send(
            frame(HEADERS, PADDED | PRIORITY_FLAG, 1, b"\x07" + b"\x00\x00\x00\x00\x10" + block[:cut1] + b"\0" * 7)
            + frame(CONTINUATION, 0, 1, block[cut1:cut2])
            + frame(CONTINUATION, END_HEADERS, 1, block[cut2:])
            + frame(0xFA, 0, 0, b"ignore me")
            + frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01\x20")
            + frame(DATA, PADDED, 1, b"\x10" + body[:3000] + b"\0" * 16)
            + frame(DATA, PADDED | END_STREAM, 1, b"\x00" + body[3000:]))
        head, answer = await client.answered(1)
        echo = verified(head, answer, "/padded")
        assert echo["body_length"] == len(body)
        assert client.goaway_code() is None and client.reset_code(1) is None
        # the priority-only stream 3 was never opened: a request on it is still served
        client.send(frame(HEADERS, END_STREAM | END_HEADERS, 3, client.block("/after")))
        verified(*await client.answered(3), "/after")


@pytest.mark.parametrize("case, expected", [
    ("frame over the max size", FRAME_SIZE_ERROR),
    ("interrupted header block", PROTOCOL_ERROR),
    ("CONTINUATION without HEADERS", PROTOCOL_ERROR),
    ("even stream id", PROTOCOL_ERROR),
    ("window overflow", FLOW_CONTROL_ERROR),
    ("zero connection window update", PROTOCOL_ERROR),
    ("PUSH_PROMISE from a client", PROTOCOL_ERROR),
    ("bad PING length", FRAME_SIZE_ERROR),
    ("SETTINGS on a stream", PROTOCOL_ERROR),
    ("header list over the limit", ENHANCE_YOUR_CALM),
])
async def test_connection_errors_get_goaway(proxy, case, expected):
    async with RawClient(proxy.port) as client:
        client.start()
        client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, client.block("/first")))
        verified(*await client.answered(1), "/first")
        big = client.block("/big", extra=[("x-big", "v" * 70_000)])
        client.send({
            "frame over the max size": frame(DATA, 0, 3, b"x" * 16385),
            "interrupted header block": frame(HEADERS, 0, 3, client.block("/x")) + frame(PING, 0, 0, b"x" * 8),
            "CONTINUATION without HEADERS": frame(CONTINUATION, END_HEADERS, 3, b"\x82"),
            "even stream id": frame(HEADERS, END_STREAM | END_HEADERS, 4, client.block("/even")),
            "window overflow": window_update(0, (1 << 31) - 1),
            "zero connection window update": window_update(0, 0),
            "PUSH_PROMISE from a client": frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x82"),
            "bad PING length": frame(PING, 0, 0, b"x" * 7),
            "SETTINGS on a stream": frame(SETTINGS, 0, 1),
            "header list over the limit": b"".join(
                frame(HEADERS if i == 0 else CONTINUATION, END_STREAM * (i == 0) | END_HEADERS * (i + 16384 >= len(big)),
                      3, big[i:i + 16384])
                for i in range(0, len(big), 16384)),
        }[case])
        assert await client.connection_error() == expected
        assert not client.of(HEADERS, 3)


async def test_a_bad_priority_frame_is_a_stream_error(proxy):
    async with RawClient(proxy.port) as client:
        client.start()
        # a PRIORITY frame of the wrong size is a stream error (§6.3), on an idle stream too
        client.send(frame(PRIORITY, 0, 3, b"\x00" * 4))
        assert await eventually(lambda: client.reset_code(3) is not None or client.goaway_code() is not None)
        if not LEAN:  # h2 (hyperframe) makes it a connection error
            assert client.goaway_code() == FRAME_SIZE_ERROR
            return
        assert client.reset_code(3) == FRAME_SIZE_ERROR and client.goaway_code() is None
        client.send(frame(HEADERS, END_STREAM | END_HEADERS, 5, client.block("/still")))
        verified(*await client.answered(5), "/still")


async def test_a_zero_stream_window_update_resets_that_stream_only(proxy):
    async with RawClient(proxy.port) as client:
        client.start()
        client.send(frame(HEADERS, END_HEADERS, 1, client.block("/held", "POST")) + window_update(1, 0))
        assert await eventually(lambda: client.reset_code(1) is not None or client.goaway_code() is not None)
        if not LEAN:  # h2 (hyperframe) makes it a connection error
            assert client.goaway_code() == PROTOCOL_ERROR
            return
        assert client.reset_code(1) == PROTOCOL_ERROR and client.goaway_code() is None
        client.send(frame(HEADERS, END_STREAM | END_HEADERS, 3, client.block("/still")))
        verified(*await client.answered(3), "/still")


async def test_data_after_end_stream_is_stream_closed(proxy):
    async with RawClient(proxy.port) as client:
        client.start((INITIAL_WINDOW_SIZE, 0))  # the answer waits for our window: the stream stays open
        client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, client.block("/ended")) + frame(DATA, 0, 1, b"late"))
        assert await eventually(lambda: client.reset_code(1) is not None or client.goaway_code() is not None)
        # RFC 9113 §5.1 half-closed (remote): STREAM_CLOSED; h2 makes it a connection error
        assert (client.reset_code(1) if LEAN else client.reset_code(1) or client.goaway_code()) == STREAM_CLOSED


async def test_the_answer_never_exceeds_the_clients_windows_or_frame_size(proxy):
    size = 100_000
    async with RawClient(proxy.port) as client:
        client.start((INITIAL_WINDOW_SIZE, 1000), (MAX_FRAME_SIZE, 20_000))
        client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1,
                          client.block("/windowed", extra=[("x-sim-response-bytes", str(size))])))
        assert await eventually(lambda: sum(len(f[3]) for f in client.of(DATA, 1)) == 1000)
        await asyncio.sleep(0.3)  # nothing more until the window opens
        assert sum(len(f[3]) for f in client.of(DATA, 1)) == 1000
        # open the stream window past the connection's (64 KiB, never raised by us): the
        # connection window holds the rest back until it opens too
        client.send(window_update(1, size))
        assert await eventually(lambda: sum(len(f[3]) for f in client.of(DATA, 1)) == 65535)
        await asyncio.sleep(0.3)
        assert sum(len(f[3]) for f in client.of(DATA, 1)) == 65535
        client.send(window_update(0, size))
        head, body = await client.answered(1)
    assert head[b":status"] == b"200" and body == bytes(i % 256 for i in range(size))
    assert max(len(f[3]) for f in client.of(DATA, 1)) <= 20_000
    assert len(client.of(DATA, 1)) < 10  # the larger max frame size was used


async def test_credit_comes_back_as_the_upload_is_taken(proxy):
    # 2 MiB through a 256 KiB stream window: only possible if the server returns credit
    body = bytes(range(256)) * 8192
    async with RawClient(proxy.port) as client:
        client.start()
        client.send(frame(HEADERS, END_HEADERS, 1, client.block("/up", "POST")))
        sent, window, conn_window = 0, 256 << 10, 65535
        while sent < len(body):
            assert await eventually(lambda: min(window + credit(client, 1), conn_window + credit(client, 0)) > sent)
            allowed = min(window + credit(client, 1), conn_window + credit(client, 0)) - sent
            step = min(allowed, 16384, len(body) - sent)
            last = sent + step == len(body)
            client.send(frame(DATA, END_STREAM if last else 0, 1, body[sent:sent + step]))
            sent += step
        head, answer = await client.answered(1)
    assert verified(head, answer, "/up")["body_length"] == len(body)


def credit(client: RawClient, stream_id: int) -> int:
    return sum(int.from_bytes(f[3], "big") for f in client.of(WINDOW_UPDATE, stream_id))


async def test_streams_past_the_concurrency_limit_are_refused():
    # An in-process server allowing two streams, whose handler holds each stream until released.
    release = asyncio.Event()

    async def handler(stream):
        await release.wait()
        stream.send_headers([(b":status", b"200")], end_stream=True)

    server = await asyncio.get_running_loop().create_server(
        lambda: h2_server_class()(handler, max_concurrent_streams=2), "127.0.0.1", 0)
    try:
        async with RawClient(server.sockets[0].getsockname()[1]) as client:
            client.start()
            for sid in (1, 3, 5):
                client.send(frame(HEADERS, END_STREAM | END_HEADERS, sid, client.block(f"/{sid}")))
            assert await eventually(lambda: client.reset_code(5) is not None or client.closed.is_set())
            if LEAN:  # RFC 9113 §5.1.2: REFUSED_STREAM, which the client may retry
                assert client.reset_code(5) == REFUSED_STREAM
                release.set()
                assert await eventually(lambda: client.ended(1) and client.ended(3))
                assert client.goaway_code() is None
            else:  # h2 makes it a connection error (§5.1.2 allows PROTOCOL_ERROR)
                assert await client.connection_error() == PROTOCOL_ERROR
    finally:
        release.set()
        server.close()
        await server.wait_closed()
