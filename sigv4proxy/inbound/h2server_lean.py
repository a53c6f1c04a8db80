"""The lean inbound HTTP/2 server (h2c with prior knowledge): our own frame handling and HPACK bytes,
the default (`--h2-server-implementation lean`); `h2server`, on the `h2` library, is the reference
that passes the same inbound tests.

Owns: one connection's protocol state without the `h2` library: the client preface, both sides'
settings, both directions of flow control (we never send past the client's windows; its credit
goes back only as bytes are taken, batched like h2's window manager), the header block being
continued (CONTINUATION), the HPACK tables (`wire.hpack_decode.HeaderBlockDecoder` for requests,
`h2_hpack.ResponseHeaderEncoder` for answers), parsing frames out of one receive buffer (frame
numbers and builders from `wire.h2_wire`, the client's lean codec) and what each frame type does
for a server (RFC 9113 §5.1 stream states and §6), and the choice between a stream error
(RST_STREAM: a malformed request, a stream's frame out of place, too many streams) and a
connection error (GOAWAY: the preface, frame sizes, HPACK, stream ids, flow-control overruns,
frames on stream 0 that belong to a stream). What happens to a stream is `h2server_core`'s.
Must never: send past a window, acknowledge bytes nobody took, skip decoding a header block (the
client's table must stay in step), keep reading after a connection error, log header values, or let
the client make it buffer without bound (stream windows, the header block limit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sigv4proxy.fields import RequestHead, request_head
from sigv4proxy.inbound.h2_hpack import ResponseHeaderEncoder
from sigv4proxy.inbound.h2server_core import (
    CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    H2ServerBase,
    StreamHandler,
)
from sigv4proxy.inbound.h2stream import ClientGone, InboundStream, wake
from sigv4proxy.wire import h2_wire as w
from sigv4proxy.wire.h2_header_blocks import HeaderBlockReader
from sigv4proxy.wire.hpack_decode import HeaderBlockDecoder, HpackDecodeError

log = logging.getLogger("sigv4proxy.inbound")

_RECV_MAX_FRAME_SIZE = w.DEFAULT_MAX_FRAME_SIZE  # we advertise no larger frames
# Credit goes back (WINDOW_UPDATE) once half a window was taken, or sooner when the window is shut
# (h2's window manager does the same): not one frame per chunk.
_STREAM_BATCH = STREAM_WINDOW // 2
_CONNECTION_BATCH = CONNECTION_WINDOW // 2


def _opening(max_streams: int) -> bytes:
    """Our SETTINGS (as the `h2` reference sends them) and the connection window opened."""
    settings = [
        (w.SETTINGS_MAX_CONCURRENT_STREAMS, max_streams),
        (w.SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
        (w.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
        (w.SETTINGS_ENABLE_PUSH, 0),
    ]
    return w.settings_frame(settings) + w.window_update_frame(0, CONNECTION_WINDOW - w.DEFAULT_WINDOW)


_OPENING = _opening(MAX_CONCURRENT_STREAMS)
_unpack_header = w.FRAME_HEADER.unpack_from
_PREFACE_SIZE = len(w.PREFACE)


class LeanStream(InboundStream):
    """An inbound stream with the windows the lean connection keeps for it."""

    __slots__ = ("send_window", "recv_window", "credit")

    def __init__(self, conn: LeanH2ServerConnection, stream_id: int, head: RequestHead) -> None:
        super().__init__(conn, stream_id, head)
        self.send_window = conn._peer_initial_window  # what we may still send on it
        self.recv_window = STREAM_WINDOW  # what the client may still send on it
        self.credit = 0  # taken, not yet returned to the client


class LeanH2ServerConnection(HeaderBlockReader, H2ServerBase):
    """One inbound h2c connection, frames parsed and built here."""

    stream_class = LeanStream
    streams: dict[int, LeanStream]  # type: ignore[assignment]
    peer = "client"
    max_header_block = 4 * MAX_HEADER_LIST_SIZE
    block_too_large = w.ENHANCE_YOUR_CALM

    def __init__(
        self,
        handler: StreamHandler,
        *,
        idle_timeout: float = 60.0,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        on_close: Callable[[H2ServerBase], None] | None = None,
    ) -> None:
        super().__init__(
            handler, idle_timeout=idle_timeout, max_concurrent_streams=max_concurrent_streams, on_close=on_close
        )
        self._opening = (
            _OPENING if max_concurrent_streams == MAX_CONCURRENT_STREAMS else _opening(max_concurrent_streams)
        )
        self._encoder = ResponseHeaderEncoder()
        self._decoder = HeaderBlockDecoder(MAX_HEADER_LIST_SIZE)
        self._out: list[bytes | memoryview] = []  # frames not yet written, in order
        self._rest = b""  # an incomplete frame (or preface) carried to the next data_received
        self._preface = False  # the client preface arrived
        self._settings_seen = False  # the client's first SETTINGS arrived
        self._highest = 0  # the highest stream id the client opened
        # the client's settings
        self._peer_initial_window = w.DEFAULT_WINDOW
        self._peer_max_frame = w.DEFAULT_MAX_FRAME_SIZE
        # flow control: what we may send / what the client may still send, credit not yet returned
        self._send_window = w.DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._credit = 0
        self._header_parts: list[bytes] = []  # a header block awaiting CONTINUATION (HeaderBlockReader)
        # the last request head judged, and the decoder's generation its fields came from
        self._head: RequestHead | None = None
        self._head_generation = -1

    # --- asyncio.Protocol ---
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._out.append(self._opening)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        end = len(data)
        pos = 0
        try:
            if not self._preface:
                if end < _PREFACE_SIZE:
                    if data != w.PREFACE[:end]:
                        raise w.ProtocolViolation(w.PROTOCOL_ERROR, "bad client preface")
                    self._rest = data
                    return
                if data[:_PREFACE_SIZE] != w.PREFACE:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "bad client preface")
                self._preface = True
                pos = _PREFACE_SIZE
            while end - pos >= 9:
                high, low, frame_type, flags, stream_id = _unpack_header(data, pos)
                length = (high << 16) | low
                if length > _RECV_MAX_FRAME_SIZE:
                    raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent an oversized frame")
                start = pos + 9
                stop = start + length
                if stop > end:
                    break
                pos = stop
                stream_id &= w.MAX_STREAM_ID
                if self._header_stream and frame_type != w.CONTINUATION:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client interrupted a header block")
                if not self._settings_seen and frame_type != w.SETTINGS:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client did not start with SETTINGS")
                if frame_type == w.DATA:
                    self._on_data(flags, stream_id, data, start, stop)
                elif frame_type == w.HEADERS:
                    self._on_headers(flags, stream_id, data, start, stop)
                else:
                    handler = _FRAME_HANDLERS.get(frame_type)
                    if handler is not None:  # unknown frame types are ignored (RFC 9113 §5.5)
                        handler(self, flags, stream_id, data[start:stop])
                if self._closed:
                    return
        except w.ProtocolViolation as err:
            self._connection_error(err.code, str(err))
            return
        if pos < end:
            self._rest = data[pos:]
        self.flush()

    # --- frames ---
    def flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self._closed or not size:
            return
        queued = False
        self._credit += size
        if self._credit >= _CONNECTION_BATCH or (self._recv_window <= 0 and self._credit > 1024):
            self._out.append(w.window_update_frame(0, self._credit))
            self._recv_window += self._credit
            self._credit = 0
            queued = True
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_ended:  # a stream that ended needs no credit
            stream.credit += size
            if stream.credit >= _STREAM_BATCH or (stream.recv_window <= 0 and stream.credit > 1024):
                self._out.append(w.window_update_frame(stream_id, stream.credit))
                stream.recv_window += stream.credit
                stream.credit = 0
                queued = True
        if queued:
            self.flush_soon()

    def _send_goaway(self) -> None:
        self._out.append(w.goaway_frame(self._highest, w.NO_ERROR))

    def _refuse_new(self, stream_id: int, code: int) -> None:
        self._out.append(w.rst_stream_frame(stream_id, code))

    def _connection_error(self, code: int, reason: str) -> None:
        log.debug("inbound HTTP/2 connection error: %s", reason)
        self._out.append(w.goaway_frame(self._highest, code))
        self.flush()
        self._closed = True  # read nothing more; connection_lost does the rest
        if self.transport is not None:
            self.transport.close()

    def _stream_error(self, stream: LeanStream, code: int) -> None:
        """RST_STREAM(code) for a stream with a frame out of place; its handler stops."""
        self._drop(stream, code)

    # --- what a stream answers with ---
    def send_headers(self, stream: InboundStream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if stream.closed or self._closed:
            raise ClientGone("client stream closed")
        self._out += w.header_frames(stream.id, self._encoder.encode(fields), end_stream, self._peer_max_frame)

    def send_data(self, stream: LeanStream, data: bytes | memoryview, end_stream: bool) -> None:  # type: ignore[override]
        if stream.closed or self._closed:
            raise ClientGone("client stream closed")
        n = len(data)
        stream.send_window -= n
        self._send_window -= n
        self._out.append(w.frame_header(w.DATA, w.FLAG_END_STREAM if end_stream else 0, stream.id, n))
        if n:
            self._out.append(data)

    def reset_stream(self, stream: InboundStream, code: int) -> None:
        if not self._closed:
            self._out.append(w.rst_stream_frame(stream.id, code))

    def window(self, stream: LeanStream) -> int:  # type: ignore[override]
        return min(stream.send_window, self._send_window)

    @property
    def connection_window(self) -> int:
        return self._send_window

    @property
    def max_frame_size(self) -> int:
        return self._peer_max_frame

    # --- receiving: DATA ---
    def _on_data(self, flags: int, stream_id: int, data: bytes, start: int, stop: int) -> None:
        length = stop - start  # flow-controlled length, padding included
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent DATA on stream 0")
        self._recv_window -= length
        if self._recv_window < 0:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "client overran the connection window")
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id)
            self.acknowledge(stream_id, length)  # a stream that closed: ignored, credit back
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "client overran a stream window")
        if stream.remote_ended:  # §5.1 half-closed (remote)
            self.acknowledge(stream_id, length)
            self._stream_error(stream, w.STREAM_CLOSED)
            return
        if flags & w.FLAG_PADDED:
            if length == 0 or data[start] >= length:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent bad DATA padding")
            payload = data[start + 1 : stop - data[start]]
        elif start == 0 and stop == len(data):
            payload = data
        else:
            payload = data[start:stop]
        self._received_data(stream, payload, length)
        if flags & w.FLAG_END_STREAM and stream.id in self.streams:
            self._remote_ended(stream)

    # --- receiving: a whole header block (HEADERS and CONTINUATION: HeaderBlockReader) ---
    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        if not stream_id & 1:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client used an even stream id")
        try:  # always decoded, whatever becomes of the stream: the client's table must stay in step
            fields = self._decoder.decode(block)
        except HpackDecodeError as err:
            if str(err) == "header list too large":  # as h2: a connection error, ENHANCE_YOUR_CALM
                raise w.ProtocolViolation(w.ENHANCE_YOUR_CALM, "client header list too large") from None
            raise w.ProtocolViolation(w.COMPRESSION_ERROR, "client sent an undecodable header block") from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers
            if stream.remote_ended:
                self._stream_error(stream, w.STREAM_CLOSED)
            elif not end_stream:
                self._refuse(stream, "trailers without END_STREAM")
            else:
                self._received_trailers(stream, fields)
                if stream.id in self.streams:
                    self._remote_ended(stream)
            return
        if stream_id <= self._highest:  # a stream that closed (§5.1)
            self._refuse_new(stream_id, w.STREAM_CLOSED)
            return
        self._highest = stream_id
        if len(self.streams) >= self._max_streams:  # §5.1.2: the client may retry it
            self._refuse_new(stream_id, w.REFUSED_STREAM)
            return
        opened = self._open_stream(stream_id, fields)
        if opened is not None and end_stream:
            self._remote_ended(opened)

    def _judge(self, fields: list[tuple[bytes, bytes]]) -> RequestHead:
        """A block decoded again to the same fields (same decoder generation: the same objects,
        never-indexed ones included) gets the same judgement; only its header list is its own."""
        head = self._head
        generation = self._decoder.generation
        if head is None or generation != self._head_generation:
            head = self._head = request_head(fields)
            self._head_generation = generation
        return RequestHead(
            head.method, head.scheme, head.authority, head.path, list(head.headers), head.content_length, head.problem
        )

    # --- receiving: control frames ---
    def _check_known(self, stream_id: int) -> None:
        """A frame for a stream not in the table: fine if the client opened it and it closed."""
        if not stream_id & 1 or stream_id > self._highest:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client used a stream it never opened")

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent RST_STREAM on stream 0")
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent a bad RST_STREAM")
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id)
            return
        self._drop(stream)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent SETTINGS on a stream")
        if flags & w.FLAG_ACK:
            if payload:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent a bad SETTINGS length")
        self._settings_seen = True
        opened = False
        for offset in range(0, len(payload), 6):
            code = int.from_bytes(payload[offset : offset + 2], "big")
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if code == w.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
            elif code == w.SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client ENABLE_PUSH not 0 or 1")
            elif code == w.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > w.MAX_WINDOW:
                    raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "client INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():  # may go negative (§6.9.2)
                    stream.send_window += delta
                    if stream.send_window > w.MAX_WINDOW:
                        raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "client overflowed a stream window")
                opened = delta > 0
            elif code == w.SETTINGS_MAX_FRAME_SIZE:
                if not w.DEFAULT_MAX_FRAME_SIZE <= value <= w.MAX_FRAME_SIZE_LIMIT:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            # MAX_CONCURRENT_STREAMS limits pushes (never sent), MAX_HEADER_LIST_SIZE is advisory
        self._out.append(w.SETTINGS_ACK)
        if opened:
            self._windows_opened()

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent PING on a stream")
        if len(payload) != 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent a bad PING")
        if not flags & w.FLAG_ACK:
            self._out.append(w.ping_ack_frame(payload))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent GOAWAY on a stream")
        if len(payload) < 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent a bad GOAWAY")
        self._peer_goaway(int.from_bytes(payload[4:8], "big"))

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "client sent a bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & w.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent a zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > w.MAX_WINDOW:
                raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "client overflowed the connection window")
            self._windows_opened()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id)
            return
        if increment == 0:
            self._stream_error(stream, w.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > w.MAX_WINDOW:
            self._stream_error(stream, w.FLOW_CONTROL_ERROR)
            return
        wake(stream.window_waiter)

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent PRIORITY on stream 0")
        if len(payload) != 5:  # §6.3: a stream error, on whatever stream it names
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._stream_error(stream, w.FRAME_SIZE_ERROR)
            else:
                self._refuse_new(stream_id, w.FRAME_SIZE_ERROR)
        # otherwise ignored: RFC 9113 deprecates the priority scheme, and it may name any stream

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent PUSH_PROMISE")


# Frame types other than DATA and HEADERS (dispatched inline in data_received), by type code.
_FRAME_HANDLERS: dict[int, Callable[[LeanH2ServerConnection, int, int, bytes], None]] = {
    w.CONTINUATION: LeanH2ServerConnection._on_continuation,
    w.RST_STREAM: LeanH2ServerConnection._on_rst_stream,
    w.SETTINGS: LeanH2ServerConnection._on_settings,
    w.PING: LeanH2ServerConnection._on_ping,
    w.GOAWAY: LeanH2ServerConnection._on_goaway,
    w.WINDOW_UPDATE: LeanH2ServerConnection._on_window_update,
    w.PRIORITY: LeanH2ServerConnection._on_priority,
    w.PUSH_PROMISE: LeanH2ServerConnection._on_push_promise,
}
