"""The simulator's connection limits, as Lattice's, over real loopback sockets with raw clients (raw
HTTP/1.1 bytes; the `h2` library as the HTTP/2 client): an idle close and a maximum connection age,
each shortened to fractions of a second, and the counter of closes by protocol and reason.

HTTP/1.1: an idle socket is simply closed (a request sent on it then gets no answer: the stale
keep-alive race a proxy must survive); at max age the response in progress ends with
`Connection: close` and the socket closes after it. HTTP/2: GOAWAY naming the last stream taken,
newer streams refused, close once the taken ones finished.
"""

from __future__ import annotations

import asyncio
import json
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from sigv4proxy.sim.server import SimConfig, start_simulator
from support.raw_http import read_response

HOST = "svc-0123.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
# The limits are what is under test, not auth: anonymous callers are let in.
ALLOW_ALL = {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "vpc-lattice-svcs:Invoke",
                            "Resource": "*"}]}
IO_TIMEOUT = 10.0


async def simulator(idle: float = 0.0, age: float = 0.0):
    return await start_simulator(SimConfig(identities={"identities": []}, policy=ALLOW_ALL, require_auth=False,
                                           idle_timeout=idle, max_connection_age=age))


def h1_request(path: str, *extra: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n" + "".join(f"{h}\r\n" for h in extra) + "\r\n").encode()


async def at_eof(reader: asyncio.StreamReader) -> bool:
    """True once the peer closed (EOF or reset) with nothing more sent."""
    try:
        return await asyncio.wait_for(reader.read(1), IO_TIMEOUT) == b""
    except ConnectionResetError:
        return True


# --- HTTP/1.1 -----------------------------------------------------------------------------------

async def test_http1_idle_close_counts_from_the_last_response_and_leaves_a_stale_socket():
    idle = 0.4
    sim = await simulator(idle=idle)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        # Requests closer together than the idle timeout keep one connection open for longer.
        for i in range(4):
            writer.write(h1_request(f"/keep/{i}"))
            status, fields, _ = await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
            assert status.startswith(b"HTTP/1.1 200") and b"connection" not in fields
            await asyncio.sleep(idle / 2)
        answered = time.monotonic() - idle / 2
        assert await at_eof(reader)
        waited = time.monotonic() - answered
        assert waited >= idle * 0.9, waited  # not before the idle timeout...
        # ...and then the socket is just gone: a request written on it is never answered.
        try:
            writer.write(h1_request("/stale"))
            await writer.drain()
        except ConnectionError:
            pass
        assert await at_eof(reader)
    finally:
        writer.close()
        await sim.aclose()
    assert [r["requestPath"] for r in sim.records] == ["/keep/0", "/keep/1", "/keep/2", "/keep/3"]
    assert sim.close_counts() == {"HTTP/1.1": {"idle": 1}}


async def test_http1_max_age_ends_the_response_in_progress_with_connection_close():
    sim = await simulator(age=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(h1_request("/slow", "x-sim-delay-ms: 1200"))  # the age passes while it waits
        status, fields, body = await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/slow"
        assert fields[b"connection"] == b"close"
        assert await at_eof(reader)
    finally:
        writer.close()
        await sim.aclose()
    assert sim.close_counts() == {"HTTP/1.1": {"max_age": 1}}


async def test_http1_max_age_during_a_response_body_closes_after_it():
    # The head left before the age passed: no header can say so, the socket closes after the body.
    n = 16 << 20
    sim = await simulator(age=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port, limit=1 << 16)
    try:
        writer.write(h1_request("/big", f"x-sim-response-bytes: {n}"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        assert b"connection: close" not in head.lower()
        await asyncio.sleep(0.6)  # unread, the body holds the simulator in write backpressure
        assert sim.close_counts() == {"HTTP/1.1": {"max_age": 1}}
        body = await asyncio.wait_for(reader.readexactly(n), IO_TIMEOUT)
        assert body[:4] == bytes(range(4)) and len(body) == n
        assert await at_eof(reader)
    finally:
        writer.close()
        await sim.aclose()


async def test_http1_max_age_closes_a_connection_between_requests():
    age = 0.5
    sim = await simulator(age=age)
    opened = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(h1_request("/one"))
        await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
        assert await at_eof(reader)
        assert time.monotonic() - opened >= age * 0.9
    finally:
        writer.close()
        await sim.aclose()
    assert sim.close_counts() == {"HTTP/1.1": {"max_age": 1}}


async def test_a_connection_that_never_sends_a_byte_is_closed_when_idle():
    sim = await simulator(idle=0.2, age=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        assert await at_eof(reader)
    finally:
        writer.close()
        await sim.aclose()
    assert sim.close_counts() == {"none": {"idle": 1}}


# --- HTTP/2 ---------------------------------------------------------------------------------------

class H2Client:
    """The `h2` library as a client over one loopback connection, until a GOAWAY arrives (h2 then
    takes no frame but another GOAWAY, so what follows it is read from the frames as received)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.received = bytearray()  # every byte the server sent
        self.eof = False
        self.h2.initiate_connection()
        self.flush()

    @classmethod
    async def connect(cls, port: int) -> "H2Client":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def get(self, path: str, *extra: tuple[str, str]) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", HOST),
                                         (":path", path), *extra], end_stream=True)
        self.flush()
        return stream_id

    def raw_get(self, stream_id: int, path: str) -> None:
        """HEADERS written as raw bytes: how a request the client sent before a GOAWAY arrived
        looks to the server (h2 itself opens no stream once it has read a GOAWAY)."""
        block = Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", path)])
        self.writer.write(HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())

    async def until(self, predicate, timeout: float = IO_TIMEOUT) -> bool:
        """Reads until `predicate(self)` holds, the peer closes or `timeout` passes; its value then."""
        deadline = time.monotonic() + timeout
        while not predicate(self) and not self.eof:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                break
            self.received += data
            if self.goaway() is None:
                for event in self.h2.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.flush()
        return predicate(self)

    def frames(self) -> list[Frame]:
        frames, view, offset = [], memoryview(bytes(self.received)), 0
        while offset + 9 <= len(view):
            frame, length = Frame.parse_frame_header(view[offset:offset + 9])
            if offset + 9 + length > len(view):
                break
            frame.parse_body(view[offset + 9:offset + 9 + length])
            frames.append(frame)
            offset += 9 + length
        return frames

    def goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.frames() if isinstance(f, GoAwayFrame)), None)

    def ended(self, stream_id: int) -> bool:
        return any(f.stream_id == stream_id and "END_STREAM" in f.flags for f in self.frames()
                   if isinstance(f, (HeadersFrame, DataFrame)))

    def status(self, stream_id: int) -> int | None:
        decoder = Decoder()  # every header block in order, as the server encoded them
        for frame in self.frames():
            if isinstance(frame, HeadersFrame):
                fields = dict(decoder.decode(frame.data))
                if frame.stream_id == stream_id and ":status" in fields:
                    return int(fields[":status"])
        return None

    def close(self) -> None:
        self.writer.close()


async def test_h2_idle_sends_goaway_then_closes_and_pings_do_not_keep_it_open():
    idle = 0.4
    sim = await simulator(idle=idle)
    client = await H2Client.connect(sim.port)
    try:
        first = client.get("/one")
        assert await client.until(lambda c: c.ended(first)) and client.status(first) == 200
        answered = time.monotonic()
        pings = 0
        while pings < 20 and client.goaway() is None and not client.eof:
            client.h2.ping(b"%08d" % pings)  # a PING is not a request: idle all the same
            client.flush()
            pings += 1
            await client.until(lambda c: c.goaway() is not None, timeout=idle / 4)
        assert pings >= 3
        assert await client.until(lambda c: c.eof)
        waited = time.monotonic() - answered
        goaway = client.goaway()
        assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR and goaway.last_stream_id == first
        assert idle * 0.9 <= waited
    finally:
        client.close()
        await sim.aclose()
    assert sim.close_counts() == {"HTTP/2": {"idle": 1}}


async def test_h2_max_age_goaway_names_the_last_stream_which_still_finishes():
    sim = await simulator(age=0.5)
    client = await H2Client.connect(sim.port)
    try:
        slow = client.get("/slow", ("x-sim-delay-ms", "1200"))  # still waiting when the age passes
        assert await client.until(lambda c: c.goaway() is not None)
        goaway = client.goaway()
        assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR and goaway.last_stream_id == slow
        assert not client.eof and not client.ended(slow)
        late = slow + 2
        client.raw_get(late, "/late")
        assert await client.until(lambda c: c.ended(slow))
        assert client.status(slow) == 200
        assert await client.until(lambda c: c.eof)
        resets = [(f.stream_id, f.error_code) for f in client.frames() if isinstance(f, RstStreamFrame)]
        assert resets == [(late, h2.errors.ErrorCodes.REFUSED_STREAM)]
    finally:
        client.close()
        await sim.aclose()
    assert [r["requestPath"] for r in sim.records] == ["/slow"]
    assert sim.close_counts() == {"HTTP/2": {"max_age": 1}}


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
async def test_a_negative_limit_is_refused(bad):
    with pytest.raises(ValueError, match="idle_timeout"):
        await start_simulator(SimConfig(identities={"identities": []}, idle_timeout=bad))
