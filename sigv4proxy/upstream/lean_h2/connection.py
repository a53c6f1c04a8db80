"""One lean HTTP/2 client connection: its state, every frame it reads, everything it writes.

Owns: the connection's protocol state without the `h2` library (the peer's settings, both
directions of flow control, the header block being continued, the HPACK tables through
`wire.h2_wire.RequestHeaderEncoder` and `wire.hpack_decode.HeaderBlockDecoder`), what each frame
type does for a client (RFC 9113 §6; the frame loop and the SETTINGS, PING, WINDOW_UPDATE and
GOAWAY rules are `wire.h2_frame_reader`'s, shared with the lean inbound server, this class their
client-side data and hooks), the choice between a stream error (RST_STREAM) and a connection error
(GOAWAY), the write queue (control frames written once per read, new streams' HEADERS once per
loop pass), and sending a stream's DATA under both windows, from the process or spliced in the
kernel (`io.splice.FrameSource`) with every other write held back while a frame is part written.
The stream states, the stream table and the error mapping are `h2_common`'s, the connection's
life-cycle state `connection_core`'s; `stream.py` decides what an upload sends and calls the
public methods here. Must never: add or drop a header other than the pseudo-headers, log or quote
header values, buffer a request body whole, send past a window, interleave a frame with another
write, let a broken response end as if complete, or let the peer make it buffer without bound.
"""

from __future__ import annotations

import asyncio
import os

from sigv4proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sigv4proxy.io.splice import FrameSource, cleartext_fd, wait_writable
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.base import (
    Body,
    ConnectionNotAvailable,
    Headers,
    Interim,
    OnChange,
    Response,
    expire_waiter,
    wake,
)
from sigv4proxy.upstream.connection_core import CLOSED, READY
from sigv4proxy.upstream.h2_common import (
    HALF_CLOSED_LOCAL,
    HALF_CLOSED_REMOTE,
    OPEN,
    H2ConnectionBase,
    status_code,
)
from sigv4proxy.upstream.lean_h2.stream import STREAM_WINDOW, LeanStream, StreamGone, send_body
from sigv4proxy.wire import h2_wire as w
from sigv4proxy.wire.h2_frame_reader import FrameReader
from sigv4proxy.wire.hpack_decode import (
    BLOCK_CACHE_ENTRIES,
    HeaderBlockDecoder,
    HpackDecodeError,
    decodes_alike,
)

CONNECTION_WINDOW = 16 << 20  # shared receive window: ~16 stalled streams before others stall
MAX_HEADER_LIST_SIZE = 64 << 10  # decoded response header list (as h2's default)
INLINE_BODY_LIMIT = 64 << 10  # bytes bodies up to this go out in the same write as HEADERS
_STREAM_CREDIT_BATCH = STREAM_WINDOW // 4  # return stream credit in steps, not per chunk
_CONNECTION_CREDIT_BATCH = CONNECTION_WINDOW // 4
_UNLIMITED = 1 << 32
_NO_BODY_STATUSES = (204, 304)

_OPENING = (
    w.PREFACE
    + w.settings_frame(
        [
            (w.SETTINGS_ENABLE_PUSH, 0),
            (w.SETTINGS_MAX_CONCURRENT_STREAMS, 100),
            (w.SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (w.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
        ]
    )
    + w.window_update_frame(0, CONNECTION_WINDOW - w.DEFAULT_WINDOW)
)
# A response head whose block decodes alike everywhere (a server repeats one within a second) is
# checked once: block -> check_fields' verdict, its field list kept as a tuple (each stream gets
# its own list). Only such blocks are stored, so a hit needs no second look at the decode cache.
# Cleared when full, as the decode cache is. Refused blocks are never stored.
_checked_heads: dict[bytes, tuple[bytes | None, tuple, int]] = {}


class LeanH2Connection(H2ConnectionBase):
    """A client HTTP/2 connection multiplexing requests; create via the pool's factory call.

    Its streams (`stream.LeanStream`) and their uploads (`stream.send_body`) use the public
    methods below the Connection interface: `consumed`, `send_data`, `send_spliced`,
    `finish_request`, `upload_done`, and the read-only `splice_fd`."""

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
        # receiving: the frame reader, which shares this state with us
        self._frames = FrameReader(
            self,
            peer="upstream",
            expects_preface=False,
            peer_max_enable_push=0,
            max_header_block=256 << 10,
            block_too_large=w.PROTOCOL_ERROR,
        )
        self._stream_table = self._streams
        self._closed = False  # `state is CLOSED` as a plain flag: the reader checks it per frame
        # Frames not yet written: control frames (written once per data_received) and new
        # streams' HEADERS (written once per loop pass, see _queue_headers). Every other write
        # sends these first, so frames leave in the order they were made.
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # A request body spliced in as DATA frames: the socket's descriptor when cleartext (-1
        # for TLS), and while a frame is part-written (`_gated`, finished by `_finisher`) every
        # other write waits in _out.
        self.splice_fd = -1
        self._gated = False
        self._finisher: asyncio.Future[None] | None = None

    # --- the Connection interface ---
    def is_available(self) -> bool:
        return (
            self.state is READY
            and len(self._streams) < self._peer_max_streams
            and self._next_stream_id <= w.MAX_STREAM_ID
        )

    def capacity(self) -> int:
        if not self.is_available():
            return 0
        # stream ids left (two per request) bound it too, near the end of the id space
        return min(self._peer_max_streams - len(self._streams), (w.MAX_STREAM_ID - self._next_stream_id) // 2 + 1)

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
        elif (
            0 < size <= INLINE_BODY_LIMIT and size <= min(send_window, self._send_window) and not self._window_queue
        ):  # never ahead of uploads waiting for window
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

    # --- for the streams: receive credit ---
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
        if self._out and not self._frames.receiving:
            self._flush()

    def reset(self, stream: LeanStream, code: int) -> None:  # type: ignore[override]
        if self.state is not CLOSED and not stream.state.closed:
            self._out.append(w.rst_stream_frame(stream.id, code))
            if not self._frames.receiving:
                self._flush()
        self._retire(stream)

    # --- for the uploads: DATA under both windows ---
    async def send_data(self, stream: LeanStream, data: bytes | bytearray | memoryview) -> None:
        """`data` as DATA frames on `stream` (not ending it), as the windows open; StreamGone or
        a typed error if it cannot."""
        view = memoryview(data)
        offset, total = 0, len(view)
        while offset < total:
            window = await self._window_for(stream)
            step = min(window, total - offset)
            parts: list[bytes] = []
            w.data_frames(parts, stream.id, view[offset : offset + step], False, self._peer_max_frame)
            stream.send_window -= step
            self._send_window -= step
            offset += step
            self._writelines(parts)
            self._window_queue.sent(self._send_window)

    def finish_request(self, stream: LeanStream, trailers: list[tuple[bytes, bytes]]) -> None:
        """Ends the request: its trailers (gRPC) if there are any, else an empty DATA frame."""
        if trailers:
            block = b"".join([w.never_indexed_name(n) + w.hpack_string(v) for n, v in trailers])
            self._write(b"".join(w.header_frames(stream.id, block, True, self._peer_max_frame)))
        else:
            self._write(w.frame_header(w.DATA, w.FLAG_END_STREAM, stream.id, 0))
        self.end_local(stream)

    def upload_done(self, stream: LeanStream) -> None:
        """The upload ended, however: its turn for the connection window passes on."""
        self._window_queue.leave(stream, self._send_window)

    async def _window_for(self, stream: LeanStream) -> int:
        """Waits until `stream` may send (write backpressure, both windows open, its turn for the
        connection window) and returns how much; StreamGone or a typed error if it cannot."""
        while True:
            await self._flow.drain(self.timeouts.read)
            if stream.error is not None:
                raise stream.error
            if stream.state.closed or self.state is CLOSED:
                raise StreamGone
            window = min(stream.send_window, self._send_window)
            if self._window_queue.may_send(stream, window, self._send_window):
                return window
            if not await self._wait_window(stream):
                raise UpstreamTimeout("upstream flow-control window stayed closed")

    async def _wait_window(self, stream: LeanStream) -> bool:
        loop = self.loop
        waiter = stream.window_waiter = loop.create_future()
        self._window_blocked.add(stream)
        timer = loop.call_later(self.timeouts.read, expire_waiter, waiter)
        try:
            return await waiter
        finally:
            stream.window_waiter = None
            self._window_blocked.discard(stream)
            timer.cancel()

    # --- for the uploads: DATA frames put together in the kernel (cleartext only) ---
    async def send_spliced(self, stream: LeanStream, source: FrameSource) -> None:
        """All of `source` as DATA frames on `stream`, the last one ending the stream (a spliced
        body has no trailers; one frame and one segment fewer than an empty END_STREAM frame
        after it). Each frame is sized to the windows and to what the client has sent, and
        written only once the connection's own writes are all in the kernel."""
        timeout = self.timeouts.read
        while source.left:
            available = await source.wait_data()
            size = min(await self._window_for(stream), self._peer_max_frame, available, source.max_payload)
            # Taken from the windows now: other streams send while this frame is put together.
            stream.send_window -= size
            self._send_window -= size
            self._window_queue.sent(self._send_window)
            flags = w.FLAG_END_STREAM if size == source.left else 0
            await source.assemble(w.frame_header(w.DATA, flags, stream.id, size), size)
            await self._wire_free(timeout)
            if not source.emit(self.splice_fd):  # the socket took part of it: finish it alone
                self._gated = True
                finisher = self._finisher = source.finisher = asyncio.ensure_future(self._finish_frame(source, timeout))
                await asyncio.shield(finisher)  # cancelled: the frame is still finished, then dropped

    async def _wire_free(self, timeout: float) -> None:
        """Returns when nothing of the connection's is waiting to be written: no frame being
        finished, our queued frames handed to the transport, the transport's buffer empty."""
        while True:
            if self.state is CLOSED:
                raise StreamGone
            finisher = self._finisher
            if finisher is not None and not finisher.done():
                done, _ = await asyncio.wait((finisher,), timeout=timeout)
                if not done:
                    raise UpstreamTimeout("upstream stopped reading")
                continue
            if self._out:
                self._flush()
            transport = self._transport
            if transport is None or not transport.get_write_buffer_size():
                return
            if not await self._writable(timeout):
                raise UpstreamTimeout("upstream stopped reading")

    async def _finish_frame(self, source: FrameSource, timeout: float) -> None:
        """Writes the rest of a part-written frame; nothing else may be written meanwhile. Not
        cancelled with the stream (shielded): a frame cut short would corrupt the connection, so
        a failure here ends the connection."""
        try:
            while not source.emit(self.splice_fd):
                if self.state is CLOSED:
                    raise UpstreamReset("upstream connection closed")
                if not await self._writable(timeout):
                    raise UpstreamTimeout("upstream stopped reading")
        except ProxyError as err:
            self._gated = False
            self._out.clear()
            if self._transport is not None:
                self._transport.abort()
            self._lost(err)
            raise
        self._gated = False
        self._flush()

    async def _writable(self, timeout: float) -> bool:
        fd = os.dup(self.splice_fd)  # the event loop watches only descriptors no transport owns
        try:
            return await wait_writable(fd, timeout)
        finally:
            os.close(fd)

    # --- the transport's protocol (by its methods; no asyncio.Protocol base, see HTTP1Connection) ---
    def data_received(self, data: bytes) -> None:
        self._frames.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.splice_fd = cleartext_fd(transport)
        self._write(_OPENING)

    # --- receiving: helpers ---
    def _check_closed_stream(self, stream_id: int) -> None:
        """A frame for a stream not in the table: fine if it was ours and is closed now."""
        if stream_id == 0 or not stream_id & 1 or stream_id >= self._next_stream_id:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "upstream used a stream we never opened")

    def _stream_error(self, stream: LeanStream, code: int, reason: str) -> None:
        self.fail_stream(stream, UpstreamProtocolError(reason), code)

    def _return_connection_credit(self, size: int) -> None:
        """Bytes nobody will read (closed stream, padding): give the connection credit back."""
        if size:
            self._connection_consumed(size)

    def _remote_end(self, stream: LeanStream) -> None:
        """END_STREAM arrived: the response ends, if its length is what it declared."""
        if (
            stream.expected >= 0
            and stream.received != stream.expected
            and not stream.head
            and stream.status not in _NO_BODY_STATUSES
        ):
            self._stream_error(stream, w.PROTOCOL_ERROR, "upstream body length differs from content-length")
            return
        self._move(stream, stream.state.on_remote_end)
        stream.wake()

    # --- receiving: DATA ---
    def _on_data(self, flags: int, stream_id: int, data: bytes, start: int, stop: int) -> None:
        length = stop - start  # padding included; FrameReader took it from the connection window
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            self._return_connection_credit(length)
            return
        padding = 0
        if flags & w.FLAG_PADDED:
            if length == 0 or data[start] >= length:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent bad DATA padding")
            padding = data[start] + 1
            payload = data[start + 1 : stop - data[start]]
        elif start == 0 and stop == len(data):
            payload = data
        else:
            payload = data[start:stop]
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._return_connection_credit(length)
            self._stream_error(stream, w.FLOW_CONTROL_ERROR, "upstream overran the stream window")
            return
        if stream.status is None or stream.state is HALF_CLOSED_REMOTE:
            self._return_connection_credit(length)
            self._stream_error(stream, w.PROTOCOL_ERROR, "upstream sent DATA outside a response body")
            return
        if stream.expected >= 0:
            stream.received += len(payload)
            if stream.received > stream.expected:
                self._return_connection_credit(length)
                self._stream_error(stream, w.PROTOCOL_ERROR, "upstream body exceeds content-length")
                return
        if padding:
            self.consumed(stream, padding)
        if payload:
            stream.chunks.append(payload)
            stream.wake()
        if flags & w.FLAG_END_STREAM:
            self._remote_end(stream)

    # --- receiving: a whole header block (HEADERS and CONTINUATION: HeaderBlockReader) ---
    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        if not stream_id & 1 or stream_id >= self._next_stream_id:
            self._check_closed_stream(stream_id)  # a push or an idle stream: connection error
        try:  # always decode, even for a closed stream: the peer's table must stay in step
            fields = self._decoder.decode(block)
        except HpackDecodeError:
            raise w.ProtocolViolation(w.COMPRESSION_ERROR, "upstream sent an undecodable header block") from None
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.state is HALF_CLOSED_REMOTE:
            self._stream_error(stream, w.STREAM_CLOSED, "upstream sent HEADERS after the end")
            return
        head = stream.status is None  # not trailers
        checked = _checked_heads.get(block) if head else None
        if checked is not None:
            status, headers, content_length = checked[0], list(checked[1]), checked[2]
        else:
            try:
                status, headers, content_length = w.check_fields(fields, not head)
            except w.MalformedFields as bad:
                self._stream_error(stream, w.PROTOCOL_ERROR, f"upstream sent a malformed response: {bad}")
                return
            if head and decodes_alike(block):  # a property of the bytes: stays true once true
                if len(_checked_heads) >= BLOCK_CACHE_ENTRIES:
                    _checked_heads.clear()
                _checked_heads[block] = (status, tuple(headers), content_length)
        if not head:  # trailers
            if not end_stream:
                self._stream_error(stream, w.PROTOCOL_ERROR, "upstream trailers did not end the stream")
                return
            stream.trailers = headers
            self._remote_end(stream)
            return
        code = status_code(status)
        if not code:
            self._stream_error(stream, w.PROTOCOL_ERROR, "upstream sent an invalid :status")
            return
        if code < 200:  # informational: the real response follows
            if end_stream or code == 101:
                self._stream_error(stream, w.PROTOCOL_ERROR, "upstream sent a bad informational response")
            else:
                self._interim(stream, code, headers)
            return
        stream.status = code
        stream.headers = headers
        stream.expected = content_length
        stream.wake()
        if stream.continue_waiter is not None:  # answered on the head alone: a held upload is not sent
            wake(stream.continue_waiter)
        if end_stream:
            self._remote_end(stream)

    # --- receiving: control frames ---
    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent a bad RST_STREAM")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            return
        code = int.from_bytes(payload, "big")
        self._peer_reset(stream, code, w.ERROR_NAMES.get(code, code))

    def _on_settings_ack(self) -> None:
        self._local_settings_acked = True
        self._check_ready()

    def _peer_setting(self, code: int, value: int) -> None:
        if code == w.SETTINGS_HEADER_TABLE_SIZE:
            self._encoder.peer_table_size_changed()
        elif code == w.SETTINGS_MAX_CONCURRENT_STREAMS:
            self._peer_max_streams = value
        elif code == w.SETTINGS_MAX_HEADER_LIST_SIZE:
            self._peer_max_header_list = value

    def _settings_applied(self, opened: bool) -> None:
        self._windows_opened()  # a new frame size or window, either way: blocked uploads look again
        self._check_ready()
        self._on_change(self)

    def _wake(self, waiter: asyncio.Future[bool] | None) -> None:
        wake(waiter)

    def _windows_opened(self) -> None:
        for stream in list(self._window_blocked):
            wake(stream.window_waiter)

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent PRIORITY on stream 0")
        if len(payload) != 5:
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._stream_error(stream, w.FRAME_SIZE_ERROR, "upstream sent a bad PRIORITY")

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise w.ProtocolViolation(w.PROTOCOL_ERROR, "upstream pushed although push is disabled")

    # --- writing ---
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
            self._closed = True
        super()._lost(err)


def _header_list_size(method: bytes, target: bytes, authority: bytes, headers: Headers) -> int:
    """RFC 9113 §6.5.2 size: names + values + 32 per field, pseudo-headers included."""
    size = 4 * 32 + 7 + len(method) + 7 + 5 + 10 + len(authority) + 5 + len(target)
    for name, value in headers:
        size += len(name) + len(value) + 32
    return size
