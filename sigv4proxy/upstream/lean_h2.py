"""Lean HTTP/2 client connection for the hot path: own frames, HPACK encoding and decoding.

Owns: one HTTP/2 connection's state without the `h2` library (stream table, both directions of
flow control, the peer's settings, GOAWAY/RST_STREAM handling), parsing frames from a single
receive buffer, and turning protocol/socket failures into our typed errors, behaving like
`http2.H2Connection` (the reference and test oracle) so the pool can use either. Must never: add
or drop a header other than the pseudo-headers, log or quote header values, buffer a request body
whole, let a broken response end as if complete, or let the peer make it buffer without bound.
"""

from __future__ import annotations

import asyncio

from sigv4proxy.errors import BadRequest, HeadersTooLarge, ProxyError, UpstreamProtocolError
from sigv4proxy.io.splice import cleartext_fd
from sigv4proxy.wire import h2_wire as w
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.base import (
    Body,
    ConnectionNotAvailable,
    Headers,
    Interim,
    OnChange,
    Response,
)
from sigv4proxy.upstream.connection_core import CLOSED, READY
from sigv4proxy.upstream.h2_common import HALF_CLOSED_LOCAL, OPEN, H2ConnectionBase
from sigv4proxy.wire.hpack_decode import HeaderBlockDecoder
from sigv4proxy.upstream.lean_h2_recv import FRAME_HANDLERS, FrameReceiver, ProtocolViolation
from sigv4proxy.upstream.lean_h2_stream import STREAM_WINDOW, LeanStream, send_body

CONNECTION_WINDOW = 16 << 20  # shared receive window: ~16 stalled streams before others stall
MAX_HEADER_LIST_SIZE = 64 << 10  # decoded response header list (as h2's default)
INLINE_BODY_LIMIT = 64 << 10  # bytes bodies up to this go out in the same write as HEADERS
_STREAM_CREDIT_BATCH = STREAM_WINDOW // 4  # return stream credit in steps, not per chunk
_CONNECTION_CREDIT_BATCH = CONNECTION_WINDOW // 4
_RECV_MAX_FRAME_SIZE = w.DEFAULT_MAX_FRAME_SIZE  # we advertise no larger frames
_UNLIMITED = 1 << 32

_OPENING = (w.PREFACE + w.settings_frame([
    (w.SETTINGS_ENABLE_PUSH, 0), (w.SETTINGS_MAX_CONCURRENT_STREAMS, 100),
    (w.SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
    (w.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
]) + w.window_update_frame(0, CONNECTION_WINDOW - w.DEFAULT_WINDOW))
_unpack_header = w.FRAME_HEADER.unpack_from


class LeanH2Connection(FrameReceiver, H2ConnectionBase, asyncio.Protocol):
    """A client HTTP/2 connection multiplexing requests; create via the pool's factory call."""

    _streams: dict[int, LeanStream]  # type: ignore[assignment]

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: OnChange) -> None:
        super().__init__(origin, timeouts, on_change)
        self._encoder = w.RequestHeaderEncoder(origin.scheme)
        self._decoder = HeaderBlockDecoder(MAX_HEADER_LIST_SIZE)  # tracks the peer's dynamic table
        self._next_stream_id = 1
        # the peer's settings
        self._peer_max_streams = _UNLIMITED
        self._peer_initial_window = w.DEFAULT_WINDOW
        self._peer_max_frame = w.DEFAULT_MAX_FRAME_SIZE
        self._peer_max_header_list: int | None = None
        # flow control: what we may send / what the peer may still send us
        self._send_window = w.DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._credit = 0  # consumed, connection credit not yet returned (batched)
        self._window_blocked: set[LeanStream] = set()
        # receiving
        self._rest = b""  # an incomplete frame carried to the next data_received
        self._receiving = False
        # Frames not yet written: control frames (written once per data_received) and new
        # streams' HEADERS (written once per loop pass, see _queue_headers). Every other write
        # sends these first, so frames leave in the order they were made.
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._header_stream = 0  # nonzero while a header block awaits CONTINUATION
        self._header_parts: list[bytes] = []
        self._header_size = 0
        self._header_end_stream = False
        # A request body spliced in as DATA frames (lean_h2_splice): the socket's descriptor when
        # cleartext, and while a frame is part-written (`_gated`) every other write waits in _out.
        self._splice_fd = -1
        self._gated = False
        self.frame_finisher: asyncio.Task[None] | None = None

    # --- the Connection interface ---
    def is_available(self) -> bool:
        return (self.state is READY and len(self._streams) < self._peer_max_streams
                and self._next_stream_id <= w.MAX_STREAM_ID)

    def capacity(self) -> int:
        if not self.is_available():
            return 0
        # stream ids left (two per request) bound it too, near the end of the id space
        return min(self._peer_max_streams - len(self._streams),
                   (w.MAX_STREAM_ID - self._next_stream_id) // 2 + 1)

    async def handle_request(self, method: bytes, target: bytes, authority: bytes,
                             headers: Headers, body: Body, interim: Interim | None = None,
                             expect_continue: bool = False) -> Response:
        if not self.is_available():
            raise ConnectionNotAvailable("connection cannot take a new stream")
        limit = self._peer_max_header_list
        if limit is not None and _header_list_size(method, target, authority, headers) > limit:
            raise HeadersTooLarge("request headers exceed the upstream's limit")
        try:
            block = self._encoder.encode(method, target, authority, headers)
        except (TypeError, AttributeError):
            raise BadRequest("request method, target or a header is not bytes") from None
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        frame_size = self._peer_max_frame
        send_window = self._peer_initial_window
        size = len(body) if isinstance(body, (bytes, bytearray, memoryview)) else -1
        if body is None or size == 0:
            parts = w.header_frames(stream_id, block, True, frame_size)
            state = HALF_CLOSED_LOCAL
        elif 0 < size <= INLINE_BODY_LIMIT and size <= min(send_window, self._send_window) \
                and not self._window_queue:  # never ahead of uploads waiting for window
            parts = w.header_frames(stream_id, block, False, frame_size)
            view = memoryview(body)  # type: ignore[arg-type]
            w.data_frames(parts, stream_id, view, True, frame_size)
            send_window -= size
            self._send_window -= size
            state = HALF_CLOSED_LOCAL
        else:
            parts = w.header_frames(stream_id, block, False, frame_size)
            state = OPEN
        stream = LeanStream(self, stream_id, send_window, method == b"HEAD", interim, state)
        self._streams[stream_id] = stream
        if len(self._streams) > 1:
            self._queue_headers(parts)
        else:  # nothing else in flight, so likely nothing to share a send with: no extra pass
            self._write(b"".join(parts))
        if state is HALF_CLOSED_LOCAL:
            stream.sent_at = self.loop.time()
        else:
            upload = send_body(self, stream, body, expect_continue)  # type: ignore[arg-type]
            stream.send_task = self.loop.create_task(upload)
        return await self._await_response(stream)

    def _send_goaway(self) -> None:
        self._out.append(w.goaway_frame(0, w.NO_ERROR))
        self._flush()

    def _send_ping(self, payload: bytes) -> None:
        self._out.append(w.frame(w.PING, 0, 0, payload))
        self._flush()

    # --- stream bookkeeping (called by LeanStream too) ---
    def consumed(self, stream: LeanStream, size: int) -> None:
        """The consumer took `size` bytes: return receive credit, batched, as WINDOW_UPDATEs."""
        if self.state is CLOSED:
            return
        state = stream.state
        if state is HALF_CLOSED_LOCAL or state is OPEN:  # the peer may still send on it
            stream.credit += size
            if stream.credit >= _STREAM_CREDIT_BATCH:
                self._out.append(w.window_update_frame(stream.id, stream.credit))
                stream.recv_window += stream.credit
                stream.credit = 0
        self._connection_consumed(size)

    def _connection_consumed(self, size: int) -> None:
        if self.state is CLOSED:
            return
        self._credit += size
        # in batches; but all of it when the peer is nearly out (stalled streams hold the rest)
        batch = _CONNECTION_CREDIT_BATCH
        if self._credit >= batch or self._recv_window <= batch:
            self._out.append(w.window_update_frame(0, self._credit))
            self._recv_window += self._credit
            self._credit = 0
        if self._out and not self._receiving:
            self._flush()

    def reset(self, stream: LeanStream, code: int) -> None:
        if self.state is not CLOSED and not stream.state.closed:
            self._out.append(w.rst_stream_frame(stream.id, code))
            if not self._receiving:
                self._flush()
        self._retire(stream)

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._splice_fd = cleartext_fd(transport)
        self._write(_OPENING)

    def data_received(self, data: bytes) -> None:
        if self.state is CLOSED:
            return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        end = len(data)
        pos = 0
        self._receiving = True
        try:
            while end - pos >= 9:
                high, low, frame_type, flags, stream_id = _unpack_header(data, pos)
                length = (high << 16) | low
                if length > _RECV_MAX_FRAME_SIZE:
                    raise ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent an oversized frame")
                start = pos + 9
                stop = start + length
                if stop > end:
                    break
                pos = stop
                stream_id &= w.MAX_STREAM_ID
                if self._header_stream and frame_type != w.CONTINUATION:
                    raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream interrupted a header block")
                if frame_type == w.DATA:
                    self._on_data(flags, stream_id, data, start, stop)
                elif not self._remote_settings_seen and frame_type != w.SETTINGS:
                    raise ProtocolViolation(w.PROTOCOL_ERROR,
                                            "upstream did not start with SETTINGS")
                elif frame_type == w.HEADERS:
                    self._on_headers(flags, stream_id, data, start, stop)
                else:
                    handler = FRAME_HANDLERS.get(frame_type)
                    if handler is not None:  # unknown frame types are ignored (RFC 9113 §5.5)
                        handler(self, flags, stream_id, data[start:stop])
                if self.state is CLOSED:
                    return
        except ProtocolViolation as err:
            self._connection_error(err.code, err.reason)
            return
        finally:
            self._receiving = False
        if pos < end:
            self._rest = data[pos:]
        if self._out:
            self._flush()

    # --- plumbing ---
    def _queue_headers(self, parts: list) -> None:
        """A new stream's frames go out with the other streams started in this loop pass: under
        load one send carries many requests (a loopback send costs more than a request's framing)."""
        self._out += parts
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _write(self, data: bytes) -> None:
        if self._out or self._gated:
            self._out.append(data)
            self._flush()
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _writelines(self, parts: list) -> None:
        """Frame headers and payload views in one vectored write: no join copy of the payload."""
        if self._out or self._gated:
            self._out += parts
            self._flush()
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.writelines(parts)

    def _flush(self) -> None:
        out = self._out
        if out and not self._gated:
            self._out = []
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _connection_error(self, code: int, reason: str) -> None:
        self._out.append(w.goaway_frame(0, code))
        self._flush()
        self._close_transport()
        self._lost(UpstreamProtocolError(reason))

    def _lost(self, err: ProxyError) -> None:
        if self.state is not CLOSED:
            self._out.clear()  # control frames for a dead socket
        super()._lost(err)


def _header_list_size(method: bytes, target: bytes, authority: bytes, headers: Headers) -> int:
    """RFC 9113 §6.5.2 size: names + values + 32 per field, pseudo-headers included."""
    size = 4 * 32 + 7 + len(method) + 7 + 5 + 10 + len(authority) + 5 + len(target)
    for name, value in headers:
        size += len(name) + len(value) + 32
    return size

