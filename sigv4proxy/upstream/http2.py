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
  last_stream_id could never finish; each connection gets its own transition table that keeps
  receiving (and sending data/window updates/resets) after GOAWAY. New streams stay refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionInputs, ConnectionState
from h2.errors import ErrorCodes

from sigv4proxy.errors import (
    BadRequest,
    ProxyError,
    RetryableStreamError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sigv4proxy.upstream.base import (
    Body,
    ConnectionNotAvailable,
    Headers,
    Origin,
    Response,
    Timeouts,
    WriteFlow,
    check_request_fields,
    request_trailers,
)

STREAM_WINDOW = 1 << 20  # per-stream receive window: what one slow consumer may have buffered
CONNECTION_WINDOW = 16 << 20  # shared receive window: 16 stalled streams before others stall
_MAX_STREAM_ID = (1 << 31) - 1

_CONFIG = h2.config.H2Configuration(
    client_side=True, header_encoding=None,
    validate_outbound_headers=False, normalize_outbound_headers=False, split_outbound_cookies=False,
    validate_inbound_headers=True, normalize_inbound_headers=False,
)

_AFTER_GOAWAY = {
    (ConnectionState.CLOSED, i): (None, ConnectionState.CLOSED)
    for i in (ConnectionInputs.RECV_HEADERS, ConnectionInputs.RECV_DATA,
              ConnectionInputs.RECV_WINDOW_UPDATE, ConnectionInputs.RECV_PING,
              ConnectionInputs.RECV_SETTINGS, ConnectionInputs.RECV_RST_STREAM,
              ConnectionInputs.RECV_PRIORITY, ConnectionInputs.RECV_ALTERNATIVE_SERVICE,
              ConnectionInputs.SEND_DATA, ConnectionInputs.SEND_WINDOW_UPDATE,
              ConnectionInputs.SEND_RST_STREAM, ConnectionInputs.SEND_PING,
              ConnectionInputs.SEND_SETTINGS)
}
_TRANSITIONS = {**h2.connection.H2ConnectionStateMachine._transitions, **_AFTER_GOAWAY}


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Stream:
    """One request/response exchange; also the `ResponseBody` the Response reads from."""

    __slots__ = ("conn", "id", "status", "headers", "trailers", "chunks", "remote_ended",
                 "local_ended", "sent_at", "error", "retired", "send_task", "unacked",
                 "event_waiter", "window_waiter")

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.remote_ended = False
        self.local_ended = False
        self.sent_at = 0.0
        self.error: ProxyError | None = None
        self.retired = False  # no longer counts against the connection's streams
        self.send_task: asyncio.Task[None] | None = None
        self.unacked = 0  # handed to the consumer, credit not yet returned
        self.event_waiter: asyncio.Future[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        _wake(self.event_waiter)

    async def wait_event(self, timeout: float | None) -> bool:
        """False on timeout."""
        waiter = self.event_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            self.event_waiter = None

    async def read(self) -> bytes:
        conn = self.conn
        if self.unacked:  # the previous chunk was consumed: hand its credit back
            conn.acknowledge(self.id, self.unacked)
            self.unacked = 0
        while True:
            if self.chunks:
                data, flow_length = self.chunks.popleft()
                if not data:  # padding-only frame
                    conn.acknowledge(self.id, flow_length)
                    continue
                self.unacked = flow_length
                return data
            if self.error is not None:
                raise self.error
            if self.remote_ended:
                return b""
            if not await self.wait_event(conn.timeouts.read):
                conn.fail_stream(self, UpstreamTimeout("upstream response body stalled"))

    async def aclose(self) -> None:
        conn = self.conn
        if self.send_task is not None and not self.send_task.done():
            self.send_task.cancel()
        if not self.retired:
            conn.reset(self, ErrorCodes.CANCEL)
        pending = self.unacked + sum(flow for _, flow in self.chunks)
        self.chunks.clear()
        self.unacked = 0
        if pending:
            conn.acknowledge(self.id, pending)


class H2Connection(asyncio.Protocol):
    """A client HTTP/2 connection multiplexing requests; create via the pool's factory call."""

    http_version = "HTTP/2"

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: Callable[[], None]) -> None:
        self.origin = origin
        self.timeouts = timeouts
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._h2 = h2.connection.H2Connection(config=_CONFIG)
        self._h2.state_machine._transitions = _TRANSITIONS  # keep streams alive after GOAWAY
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._scheme = origin.scheme.encode()
        self._flow = WriteFlow()
        self._ready: asyncio.Future[bool] = self._loop.create_future()
        self._remote_settings_seen = False
        self._local_settings_acked = False
        self._closed = False
        self._goaway = False
        self._idle_since = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- the Connection interface ---
    def is_available(self) -> bool:
        return (not self._closed and not self._goaway and self._ready.done()
                and self._ready.result()
                and len(self._streams) < self._h2.remote_settings.max_concurrent_streams
                and self._h2.highest_outbound_stream_id < _MAX_STREAM_ID - 2)

    def is_idle(self) -> bool:
        return not self._closed and not self._streams

    def is_closed(self) -> bool:
        return self._closed

    def has_expired(self, now: float) -> bool:
        return self.is_idle() and now - self._idle_since > self.timeouts.idle

    def active_streams(self) -> int:
        return len(self._streams)

    async def wait_ready(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                ok = await asyncio.shield(self._ready)
        except TimeoutError:
            self._close_transport()
            raise UpstreamTimeout("HTTP/2 settings exchange timed out") from None
        if not ok:
            raise UpstreamConnectError("connection closed during HTTP/2 setup")

    async def handle_request(self, method: bytes, target: bytes, authority: bytes,
                             headers: Headers, body: Body) -> Response:
        check_request_fields(method, target, authority, headers)
        if not self.is_available():
            raise ConnectionNotAvailable("connection cannot take a new stream")
        stream_id = self._h2.get_next_available_stream_id()
        stream = _Stream(self, stream_id)
        fields = [(b":method", method), (b":scheme", self._scheme), (b":authority", authority),
                  (b":path", target)]
        fields.extend([(name.lower(), value) for name, value in headers])
        is_bytes = isinstance(body, (bytes, bytearray, memoryview))
        end_stream = body is None or (is_bytes and not body)
        try:
            self._h2.send_headers(stream_id, fields, end_stream=end_stream)
        except h2.exceptions.ProtocolError:  # e.g. the peer's stream limit, raced with us
            raise ConnectionNotAvailable("connection refused a new stream") from None
        self._streams[stream_id] = stream
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._flush()
        if end_stream:
            stream.local_ended = True
            stream.sent_at = self._loop.time()
        else:
            stream.send_task = self._loop.create_task(self._send_body(stream, body))
        try:
            await self._await_head(stream)
        except BaseException:
            await stream.aclose()
            raise
        return Response(stream.status, stream.headers, self.http_version, stream)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """GOAWAY(NO_ERROR), close the socket, fail whatever is still open."""
        if self._closed:
            return
        try:
            self._h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass
        self._close_transport()
        self._lost(UpstreamReset("upstream connection closed"))

    # --- request side ---
    async def _await_head(self, stream: _Stream) -> None:
        while stream.status is None:
            if stream.error is not None:
                raise stream.error
            timeout = None  # while uploading, the send task bounds every network wait
            if stream.local_ended:
                timeout = stream.sent_at + self.timeouts.first_byte - self._loop.time()
                if timeout <= 0:
                    self.fail_stream(stream, UpstreamTimeout("no upstream response in time"))
                    continue
            await stream.wait_event(timeout)

    async def _send_body(self, stream: _Stream, body: bytes | AsyncIterable[bytes]) -> None:
        try:
            if isinstance(body, (bytes, bytearray, memoryview)):
                await self._send_chunk(stream, body)
            else:
                try:
                    iterator = body.__aiter__()
                except Exception:
                    raise BadRequest("request body is not iterable") from None
                while True:
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    except ProxyError:
                        raise
                    except Exception:
                        raise BadRequest("request body could not be read") from None
                    if chunk:
                        await self._send_chunk(stream, chunk)
            if stream.retired or self._closed:
                return
            trailers = request_trailers(body)
            if trailers:  # request trailers end the stream instead of an empty DATA frame
                self._h2.send_headers(stream.id, trailers, end_stream=True)
            else:
                self._h2.end_stream(stream.id)
            self._flush()
            stream.local_ended = True
            stream.sent_at = self._loop.time()
            if stream.remote_ended:
                self._retire(stream)
            stream.wake()
        except h2.exceptions.StreamClosedError:
            pass  # the peer reset the stream; its StreamReset event already recorded why
        except ProxyError as err:
            if stream.remote_ended:  # the response is complete; only the upload stops
                self.reset(stream, ErrorCodes.CANCEL)
            else:
                self.fail_stream(stream, err)

    async def _send_chunk(self, stream: _Stream, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        offset, total = 0, len(view)
        while offset < total:
            if stream.error is not None:
                raise stream.error
            if stream.retired:
                raise h2.exceptions.StreamClosedError(stream.id)
            await self._flow.drain(self.timeouts.read)
            window = self._h2.local_flow_control_window(stream.id)
            if window <= 0:
                waiter = stream.window_waiter = self._loop.create_future()
                try:
                    async with asyncio.timeout(self.timeouts.read):
                        await waiter
                except TimeoutError:
                    raise UpstreamTimeout("upstream flow-control window stayed closed") from None
                finally:
                    stream.window_waiter = None
                continue
            frame_size = self._h2.max_outbound_frame_size
            end = offset + min(window, total - offset)
            while offset < end:
                step = min(frame_size, end - offset)
                self._h2.send_data(stream.id, view[offset:offset + step])
                offset += step
            self._flush()

    # --- stream bookkeeping (called by _Stream too) ---
    def acknowledge(self, stream_id: int, size: int) -> None:
        if self._closed:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        if not self._closed and not stream.retired:
            try:
                self._h2.reset_stream(stream.id, code)
            except h2.exceptions.ProtocolError:  # includes StreamClosedError
                pass
            self._flush()
        self._retire(stream)

    def fail_stream(self, stream: _Stream, err: ProxyError) -> None:
        if stream.error is None and not stream.remote_ended:
            stream.error = err
        self.reset(stream, ErrorCodes.CANCEL)
        stream.wake()
        _wake(stream.window_waiter)

    def _retire(self, stream: _Stream) -> None:
        if stream.retired:
            return
        stream.retired = True
        self._streams.pop(stream.id, None)
        if not self._streams and not self._closed:
            if self._goaway:
                self._close_transport()
            else:
                self._idle_since = self._loop.time()
                self._idle_timer = self._loop.call_later(self.timeouts.idle, self._idle_expired)
        self._on_change()

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self._streams and not self._closed:
            self.close()

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

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamReset("upstream connection lost"))

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    # --- h2 events ---
    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        status = b""
        headers = []
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":status":
                    status = value
            else:
                headers.append((name, value))
        if not status.isdigit() or len(status) != 3:
            self.fail_stream(stream, UpstreamProtocolError("upstream sent an invalid :status"))
            return
        stream.status = int(status)
        stream.headers = headers
        stream.wake()

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.trailers = [(n, v) for n, v in event.headers if n[:1] != b":"]

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.error is not None:  # nobody will read it: return the credit
            self.acknowledge(event.stream_id, event.flow_controlled_length)
            return
        stream.chunks.append((event.data, event.flow_controlled_length))
        stream.wake()

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if stream.status is None:
            self.fail_stream(stream, UpstreamProtocolError("upstream ended a stream without a response"))
            return
        stream.remote_ended = True
        if stream.local_ended:
            self._retire(stream)
        stream.wake()

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if event.error_code == ErrorCodes.REFUSED_STREAM:
            err: ProxyError | None = RetryableStreamError("upstream refused the stream")
        elif stream.remote_ended:
            err = None  # response complete; the peer only stops our upload
        else:
            code = event.error_code
            err = UpstreamReset(f"upstream reset the stream ({getattr(code, 'name', code)})")
        if err is not None and stream.error is None:
            stream.error = err
        self._retire(stream)
        stream.wake()
        _wake(stream.window_waiter)

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id == 0:
            for stream in self._streams.values():
                _wake(stream.window_waiter)
        else:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                _wake(stream.window_waiter)

    def _on_remote_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in self._streams.values():
                _wake(stream.window_waiter)
        self._remote_settings_seen = True
        self._check_ready()
        self._on_change()

    def _on_settings_acked(self, event: h2.events.SettingsAcknowledged) -> None:
        self._local_settings_acked = True
        self._check_ready()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._goaway = True
        last = event.last_stream_id if event.last_stream_id is not None else _MAX_STREAM_ID
        for stream in list(self._streams.values()):
            if stream.id > last:
                stream.error = RetryableStreamError("stream not processed before GOAWAY")
                self._retire(stream)
                stream.wake()
                _wake(stream.window_waiter)
        if not self._ready.done():
            self._ready.set_result(False)
        if not self._streams:
            self._close_transport()
        self._on_change()

    def _check_ready(self) -> None:
        if self._remote_settings_seen and self._local_settings_acked and not self._ready.done():
            self._ready.set_result(True)
            self._on_change()

    # --- plumbing ---
    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close_transport(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _lost(self, err: ProxyError) -> None:
        if self._closed:
            return
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._flow.fail(err)
        if not self._ready.done():
            self._ready.set_result(False)
        for stream in list(self._streams.values()):
            if stream.error is None and not stream.remote_ended:
                stream.error = err
            stream.retired = True
            stream.wake()
            _wake(stream.window_waiter)
        self._streams.clear()
        self._on_change()


_HANDLERS: dict[type, Callable[[H2Connection, object], None]] = {
    h2.events.ResponseReceived: H2Connection._on_response,
    h2.events.TrailersReceived: H2Connection._on_trailers,
    h2.events.DataReceived: H2Connection._on_data,
    h2.events.StreamEnded: H2Connection._on_stream_ended,
    h2.events.StreamReset: H2Connection._on_stream_reset,
    h2.events.WindowUpdated: H2Connection._on_window_updated,
    h2.events.RemoteSettingsChanged: H2Connection._on_remote_settings,
    h2.events.SettingsAcknowledged: H2Connection._on_settings_acked,
    h2.events.ConnectionTerminated: H2Connection._on_goaway,
}  # type: ignore[dict-item]
