"""A small scriptable h2c client (prior knowledge) for the inbound HTTP/2 tests.

Owns: one loopback connection driven by the `h2` library, per-stream records of what came back
(head, body, trailers, RST code) and helpers to send data within the server's windows. With
`validate=False` it sends header fields exactly as given (malformed ones too), and `send_raw`
writes bytes h2 would refuse to frame. Must never: connect anywhere but loopback, or outlive its
test (`async with`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
from h2.connection import ConnectionInputs, ConnectionState
from hyperframe.frame import HeadersFrame

# h2 stops accepting frames once a GOAWAY arrived; streams the server still finishes must not be
# refused by our own client (the same work-around as the proxy's upstream client).
_AFTER_GOAWAY = {
    (ConnectionState.CLOSED, i): (None, ConnectionState.CLOSED)
    for i in (ConnectionInputs.RECV_HEADERS, ConnectionInputs.RECV_DATA,
              ConnectionInputs.RECV_WINDOW_UPDATE, ConnectionInputs.RECV_PING,
              ConnectionInputs.RECV_SETTINGS, ConnectionInputs.RECV_RST_STREAM,
              ConnectionInputs.SEND_DATA, ConnectionInputs.SEND_WINDOW_UPDATE,
              ConnectionInputs.SEND_RST_STREAM, ConnectionInputs.SEND_PING,
              ConnectionInputs.SEND_SETTINGS)
}
_TRANSITIONS = {**h2.connection.H2ConnectionStateMachine._transitions, **_AFTER_GOAWAY}


def _as_bytes(fields) -> list[tuple[bytes, bytes]]:
    return [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
            for n, v in fields]


@dataclass
class StreamRecord:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset_code: int | None = None
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)  # 1xx heads, in order
    data: asyncio.Event = field(default_factory=asyncio.Event)  # set at each DATA frame
    ended: bool = False
    head_end_stream: bool = False  # the head came with END_STREAM (trailers-only / no body)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    head: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def trailer(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.trailers if n == name), None)


class H2TestClient:
    def __init__(self, host: str, port: int, *, auto_ack: bool = True, validate: bool = True) -> None:
        assert host in ("127.0.0.1", "::1")
        self.host, self.port, self.auto_ack = host, port, auto_ack
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=False,
            validate_outbound_headers=validate, normalize_outbound_headers=validate))
        self.h2.state_machine._transitions = _TRANSITIONS
        self.sent: dict[int, int] = {}  # request body bytes handed to the socket per stream
        self.streams: dict[int, StreamRecord] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.half_closed = False
        self._window = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> H2TestClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.h2.initiate_connection()
        self.flush()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._writer is not None:
            self._writer.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing() and not self.half_closed:
            self._writer.write(data)

    def half_close(self) -> None:
        """TCP half-close: nothing more is sent (frames h2 queues from now on are dropped)."""
        self.flush()
        self.half_closed = True
        self._writer.write_eof()

    # --- sending ---
    def request(self, method: str, path: str, authority: str, headers=(), *, end_stream=True,
                body: bytes | None = None) -> int:
        return self.request_fields([(":method", method), (":scheme", "http"), (":authority", authority),
                                    (":path", path), *headers], end_stream=end_stream, body=body)

    def request_fields(self, fields, *, end_stream=True, body: bytes | None = None, flush=True) -> int:
        """A request with exactly these fields (pseudo-headers included, in this order); `body`
        leaves in the same write as the head, and `flush=False` leaves both for the next write."""
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = StreamRecord()
        self.h2.send_headers(sid, _as_bytes(fields), end_stream=end_stream and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end_stream)
        if flush:
            self.flush()
        return sid

    def request_raw(self, fields, *, end_stream=True) -> int:
        """A request head h2 refuses to send (a leading `:status`): h2 opens the stream with a
        stand-in head that never leaves (encoded apart, so that this connection's HPACK table
        stays in step with the server's), and the real block goes out instead."""
        self.flush()
        sid = self.h2.get_next_available_stream_id()
        encoder, self.h2.encoder = self.h2.encoder, hpack.Encoder()
        try:
            self.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                       (b":authority", b"stand-in")], end_stream=end_stream)
        finally:
            self.h2.encoder = encoder
        self.h2.data_to_send()  # the stand-in: dropped
        self.streams[sid] = StreamRecord()
        self.send_raw_headers(sid, fields, end_stream=end_stream)
        return sid

    def send_raw_headers(self, sid: int, fields, *, end_stream: bool) -> None:
        """A HEADERS frame h2 would refuse to send (e.g. trailers without END_STREAM), encoded with
        this connection's own HPACK encoder; it leaves in one write with any frames pending."""
        frame = HeadersFrame(sid, flags=["END_HEADERS", *(["END_STREAM"] if end_stream else [])])
        frame.data = self.h2.encoder.encode(_as_bytes(fields))
        self.send_raw(frame.serialize())

    def send_raw(self, data: bytes) -> None:
        """Frames pending in h2, then `data`, in one write."""
        self._writer.write(self.h2.data_to_send() + data)

    async def send_data(self, sid: int, data: bytes, *, end_stream: bool = False, timeout: float = 10) -> None:
        view, offset = memoryview(data), 0
        async with asyncio.timeout(timeout):
            while offset < len(data):
                window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if window <= 0:
                    self._window.clear()
                    await self._window.wait()
                    continue
                n = min(window, len(data) - offset)
                self.h2.send_data(sid, bytes(view[offset:offset + n]))
                offset += n
                self.sent[sid] = self.sent.get(sid, 0) + n
                self.flush()
                await self._writer.drain()
        if end_stream:
            self.h2.end_stream(sid)
            self.flush()

    def send_trailers(self, sid: int, trailers) -> None:
        self.h2.send_headers(sid, [(n.encode(), v.encode()) for n, v in trailers], end_stream=True)
        self.flush()

    def reset(self, sid: int, code: int = 8) -> None:
        self.h2.reset_stream(sid, code)
        self.flush()

    async def wait(self, sid: int, timeout: float = 10) -> StreamRecord:
        record = self.streams[sid]
        await asyncio.wait_for(record.done.wait(), timeout)
        return record

    def ack(self, sid: int, size: int) -> None:
        self.h2.acknowledge_received_data(size, sid)
        self.flush()

    # --- receiving ---
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._on(event)
                self.flush()
        finally:
            self.closed.set()
            for record in self.streams.values():
                record.done.set()

    def _on(self, event) -> None:
        record = self.streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, h2.events.ResponseReceived) and record is not None:
            for header in event.headers:  # kept whole: tests can see never-indexed fields
                if header[0] == b":status":
                    record.status = int(header[1])
                else:
                    record.headers.append(header)
            record.head_end_stream = event.stream_ended is not None
            record.head.set()
        elif isinstance(event, h2.events.InformationalResponseReceived) and record is not None:
            record.informational.append(list(event.headers))
        elif isinstance(event, h2.events.DataReceived) and record is not None:
            record.body += event.data
            record.data.set()
            if self.auto_ack:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and record is not None:
            record.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and record is not None:
            record.ended = True
            record.done.set()
        elif isinstance(event, h2.events.StreamReset) and record is not None:
            record.reset_code = int(event.error_code)
            record.done.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
