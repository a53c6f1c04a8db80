"""HTTP/2 client connection on the `h2` library: the reference implementation and test oracle.

Owns: all h2 state (the only module that touches it), multiplexing, flow control both ways,
GOAWAY/RST_STREAM handling, and turning h2/socket failures into our typed errors. Must never: add
or drop a header other than the pseudo-headers, log header values, buffer a request body whole, or
let a broken response body end as if it were complete.

h2 configuration, chosen deliberately:
- header_encoding=None: headers stay bytes, exactly as signed (no str round-trip).
- validate_outbound_headers=False, normalize_outbound_headers=False, split_outbound_cookies=False:
  the caller's headers are sent untouched (h2 would strip whitespace and split cookies). Names are
  lowercased because RFC 9113 8.2.1 makes uppercase names malformed (SigV4 signs them lowercased).
- validate_inbound_headers=True: responses are forwarded to clients, so reject CR/LF/NUL in values,
  connection-specific headers and bad pseudo-headers here (costs CPU; the lean path may differ).
- normalize_inbound_headers=False: response headers as received.
- h2 moves to CLOSED on receiving GOAWAY and then refuses every frame, so streams at or below
  last_stream_id could never finish: `compat.h2.keep_streams_after_goaway` lets them (receiving,
  and sending data/window updates/resets) on each connection. New streams stay refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, Callable
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

import sigv4proxy.compat.hyperframe  # noqa: F401  (h2 reprs every received frame)
from sigv4proxy.compat.h2 import keep_streams_after_goaway
from sigv4proxy.errors import ProxyError, UpstreamProtocolError, UpstreamTimeout
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.base import (
    Body,
    ConnectionNotAvailable,
    Headers,
    Interim,
    OnChange,
    Response,
    check_request_fields,
    request_trailers,
    wake,
)
from sigv4proxy.upstream.connection_core import CLOSED, READY, feed_body
from sigv4proxy.upstream.h2_common import H2ConnectionBase, H2StreamBase, status_code

STREAM_WINDOW = 1 << 20  # per-stream receive window: what one slow consumer may have buffered
CONNECTION_WINDOW = 16 << 20  # shared receive window: 16 stalled streams before others stall
_MAX_STREAM_ID = (1 << 31) - 1

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    split_outbound_cookies=False,
    validate_inbound_headers=True,
    normalize_inbound_headers=False,
)


class _Stream(H2StreamBase):
    """One request/response exchange; also the `ResponseBody` the Response reads from."""

    __slots__ = ()

    conn: H2Connection
    chunks: deque[tuple[bytes, int]]  # (data, flow-controlled length)

    def take(self) -> bytes | None:
        conn = self.conn
        if self.unacked:  # the previous chunk was consumed: hand its credit back
            conn.acknowledge(self.id, self.unacked)
            self.unacked = 0
        while self.chunks:
            data, flow_length = self.chunks.popleft()
            if not data:  # padding-only frame
                conn.acknowledge(self.id, flow_length)
                continue
            self.unacked = flow_length
            return data
        return self._nothing_here()

    def _buffered_credit(self) -> int:
        return sum(flow for _, flow in self.chunks)

    def _return_credit(self, size: int) -> None:
        self.conn.acknowledge(self.id, size)


class H2Connection(H2ConnectionBase, asyncio.Protocol):
    """A client HTTP/2 connection multiplexing requests; create via the pool's factory call."""

    _streams: dict[int, _Stream]  # type: ignore[assignment]

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: OnChange) -> None:
        super().__init__(origin, timeouts, on_change)
        self._h2 = h2.connection.H2Connection(config=_CONFIG)
        keep_streams_after_goaway(self._h2)
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self._scheme = origin.scheme.encode()

    # --- the Connection interface ---
    def is_available(self) -> bool:
        return (
            self.state is READY
            and len(self._streams) < self._h2.remote_settings.max_concurrent_streams
            and self._h2.highest_outbound_stream_id < _MAX_STREAM_ID - 2
        )

    def capacity(self) -> int:
        if not self.is_available():
            return 0
        return max(
            1,
            min(
                self._h2.remote_settings.max_concurrent_streams - len(self._streams),
                (_MAX_STREAM_ID - 2 - self._h2.highest_outbound_stream_id) // 2,
            ),
        )

    async def handle_request(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        body: Body,
        interim: Interim | None = None,
        expect_continue: bool = False,
    ) -> Response:
        check_request_fields(method, target, authority, headers)
        if not self.is_available():
            raise ConnectionNotAvailable("connection cannot take a new stream")
        stream_id = self._h2.get_next_available_stream_id()
        stream = _Stream(self, stream_id, interim)
        fields = [(b":method", method), (b":scheme", self._scheme), (b":authority", authority), (b":path", target)]
        fields.extend([(name.lower(), value) for name, value in headers])
        is_bytes = isinstance(body, (bytes, bytearray, memoryview))
        end_stream = body is None or (is_bytes and not body)
        try:
            self._h2.send_headers(stream_id, fields, end_stream=end_stream)
        except h2.exceptions.ProtocolError:  # e.g. the peer's stream limit, raced with us
            raise ConnectionNotAvailable("connection refused a new stream") from None
        self._streams[stream_id] = stream
        self._flush()
        if end_stream:
            self.end_local(stream)
        else:
            assert body is not None  # an empty one ended the stream with its head
            stream.send_task = self.loop.create_task(self._send_body(stream, body, expect_continue and not is_bytes))
        return await self._await_response(stream)

    def _send_ping(self, payload: bytes) -> None:
        try:
            self._h2.ping(payload)
            self._flush()
        except h2.exceptions.ProtocolError:
            pass

    def _on_ping_acked(self, event: h2.events.PingAckReceived) -> None:
        self._on_ping_ack(event.ping_data)

    def _send_goaway(self) -> None:
        try:
            self._h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass

    # --- request side ---
    async def _send_body(self, stream: _Stream, body: bytes | AsyncIterable[bytes], expect_continue: bool) -> None:
        try:
            if expect_continue and not await self.hold_upload(stream):
                return  # answered on the head alone: the body is not sent (the stream is reset)
            await feed_body(body, partial(self._send_chunk, stream))
            if stream.state.closed or self.state is CLOSED:
                return
            trailers = request_trailers(body)
            if trailers:  # request trailers end the stream instead of an empty DATA frame
                self._h2.send_headers(stream.id, trailers, end_stream=True)
            else:
                self._h2.end_stream(stream.id)
            self._flush()
            self.end_local(stream)
        except h2.exceptions.StreamClosedError:
            pass  # the peer reset the stream; its StreamReset event already recorded why
        except ProxyError as err:
            if stream.state.remote_ended:  # the response is complete; only the upload stops
                self.reset(stream, ErrorCodes.CANCEL)
            else:
                self.fail_stream(stream, err)
        finally:
            self._window_queue.leave(stream, self._h2.outbound_flow_control_window)

    async def _send_chunk(self, stream: _Stream, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        offset, total = 0, len(view)
        while offset < total:
            if stream.error is not None:
                raise stream.error
            if stream.state.closed:
                raise h2.exceptions.StreamClosedError(stream.id)
            await self._flow.drain(self.timeouts.read)
            window = self._h2.local_flow_control_window(stream.id)  # min(stream, connection)
            if not self._window_queue.may_send(stream, window, self._h2.outbound_flow_control_window):
                await self._wait_window(stream)
                continue
            frame_size = self._h2.max_outbound_frame_size
            end = offset + min(window, total - offset)
            while offset < end:
                step = min(frame_size, end - offset)
                self._h2.send_data(stream.id, view[offset : offset + step])
                offset += step
            self._flush()
            self._window_queue.sent(self._h2.outbound_flow_control_window)

    async def _wait_window(self, stream: _Stream) -> None:
        waiter = stream.window_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(self.timeouts.read):
                await waiter
        except TimeoutError:
            raise UpstreamTimeout("upstream flow-control window stayed closed") from None
        finally:
            stream.window_waiter = None

    # --- stream bookkeeping (called by _Stream too) ---
    def acknowledge(self, stream_id: int, size: int) -> None:
        if self.state is CLOSED:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def reset(self, stream: H2StreamBase, code: int) -> None:
        if self.state is not CLOSED and not stream.state.closed:
            try:
                self._h2.reset_stream(stream.id, code)
            except h2.exceptions.ProtocolError:  # includes StreamClosedError
                pass
            self._flush()
        self._retire(stream)

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2 queued a GOAWAY for the peer
            self._close_transport()
            self._lost(UpstreamProtocolError("upstream HTTP/2 protocol error"))
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        self._flush()

    # --- h2 events ---
    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        status = b""
        headers = []
        for field in event.headers:  # kept whole: a never-indexed field stays marked as one
            name, value = field
            if name[:1] == b":":
                if name == b":status":
                    status = value
            else:
                headers.append(field)
        code = status_code(status)
        if not code:
            self.fail_stream(stream, UpstreamProtocolError("upstream sent an invalid :status"))
            return
        stream.status = code
        stream.headers = headers
        stream.wake()
        if stream.continue_waiter is not None:  # answered on the head alone: a held upload is not sent
            wake(stream.continue_waiter)

    def _on_informational(self, event: h2.events.InformationalResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        status = b""
        headers = []
        for name, value in event.headers:
            if name == b":status":
                status = value
            elif name[:1] != b":":
                headers.append((name, value))
        code = status_code(status)
        if code == 101 or not 100 <= code < 200:
            self.fail_stream(stream, UpstreamProtocolError("upstream sent a bad informational response"))
            return
        self._interim(stream, code, headers)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.trailers = [field for field in event.headers if field[0][:1] != b":"]

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.error is not None:  # nobody will read it: return the credit
            self.acknowledge(event.stream_id, event.flow_controlled_length)
            return
        if event.flow_controlled_length:  # an empty DATA frame (often the END_STREAM) holds nothing
            stream.chunks.append((event.data, event.flow_controlled_length))
            stream.wake()

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if stream.status is None:
            self.fail_stream(stream, UpstreamProtocolError("upstream ended a stream without a response"))
            return
        self._move(stream, stream.state.on_remote_end)
        stream.wake()

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        code = event.error_code
        self._peer_reset(stream, code, getattr(code, "name", code))

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id == 0:
            for each in self._streams.values():
                wake(each.window_waiter)
        else:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                wake(stream.window_waiter)

    def _on_remote_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in self._streams.values():
                wake(stream.window_waiter)
        self._remote_settings_seen = True
        self._check_ready()
        self._on_change(self)

    def _on_settings_acked(self, event: h2.events.SettingsAcknowledged) -> None:
        self._local_settings_acked = True
        self._check_ready()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id
        self._peer_goaway(last if last is not None else _MAX_STREAM_ID, event.error_code or 0)

    # --- plumbing ---
    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


_HANDLERS: dict[type, Callable[[H2Connection, Any], None]] = {
    h2.events.ResponseReceived: H2Connection._on_response,
    h2.events.InformationalResponseReceived: H2Connection._on_informational,
    h2.events.TrailersReceived: H2Connection._on_trailers,
    h2.events.DataReceived: H2Connection._on_data,
    h2.events.StreamEnded: H2Connection._on_stream_ended,
    h2.events.StreamReset: H2Connection._on_stream_reset,
    h2.events.WindowUpdated: H2Connection._on_window_updated,
    h2.events.RemoteSettingsChanged: H2Connection._on_remote_settings,
    h2.events.SettingsAcknowledged: H2Connection._on_settings_acked,
    h2.events.ConnectionTerminated: H2Connection._on_goaway,
    h2.events.PingAckReceived: H2Connection._on_ping_acked,
}
