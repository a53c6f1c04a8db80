"""The lean inbound HTTP/2 server (h2c with prior knowledge): our own frame handling and HPACK bytes,
the default (`--h2-server-implementation lean`); `h2server`, on the `h2` library, is the reference
that passes the same inbound tests.

Owns: one connection's protocol state without the `h2` library: both sides' settings, both
directions of flow control (we never send past the client's windows; its credit goes back only as
bytes are taken, batched like h2's window manager), the header block being continued
(CONTINUATION), the HPACK tables (`wire.hpack_decode.HeaderBlockDecoder` for requests,
`h2_hpack.ResponseHeaderEncoder` for answers), what each frame type does for a server (RFC 9113
§5.1 stream states and §6; the frame loop and the SETTINGS, PING, WINDOW_UPDATE and GOAWAY rules
are `wire.h2_frame_reader`'s, shared with the lean client, this class their server-side data and
hooks: the client preface expected, ENABLE_PUSH 1 allowed), and the choice between a stream error
(RST_STREAM: a malformed request, a stream's frame out of place, too many streams) and a
connection error (GOAWAY: the preface, frame sizes, HPACK, stream ids, flow-control overruns,
frames on stream 0 that belong to a stream). What happens to a stream is `h2server_core`'s.
Must never: send past a window, acknowledge bytes nobody took, skip decoding a header block (the
client's table must stay in step), keep reading after a connection error, log header values, or let
the client make it buffer without bound (stream windows, the header block limit).
"""

from __future__ import annotations

import asyncio
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
from sigv4proxy.wire.h2_frame_reader import FrameReader
from sigv4proxy.wire.hpack_decode import HeaderBlockDecoder, HpackDecodeError

log = logging.getLogger("sigv4proxy.inbound")

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


class LeanStream(InboundStream):
    """An inbound stream with the windows the lean connection keeps for it."""

    __slots__ = ("send_window", "recv_window", "credit")

    def __init__(self, conn: LeanH2ServerConnection, stream_id: int, head: RequestHead) -> None:
        super().__init__(conn, stream_id, head)
        self.send_window = conn._peer_initial_window  # what we may still send on it
        self.recv_window = STREAM_WINDOW  # what the client may still send on it
        self.credit = 0  # taken, not yet returned to the client


class LeanH2ServerConnection(H2ServerBase):
    """One inbound h2c connection, frames parsed and built here."""

    stream_class = LeanStream
    streams: dict[int, LeanStream]  # type: ignore[assignment]

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
        # receiving: the frame reader, which shares this state with us
        self._frames = FrameReader(
            self,
            peer="client",
            expects_preface=True,
            peer_max_enable_push=1,
            max_header_block=4 * MAX_HEADER_LIST_SIZE,
            block_too_large=w.ENHANCE_YOUR_CALM,
        )
        self._stream_table = self.streams  # the reader's name for them
        self._remote_settings_seen = False
        self._highest = 0  # the highest stream id the client opened
        # the client's settings
        self._peer_initial_window = w.DEFAULT_WINDOW
        self._peer_max_frame = w.DEFAULT_MAX_FRAME_SIZE
        # flow control: what we may send / what the client may still send, credit not yet returned
        self._send_window = w.DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._credit = 0
        # the last request head judged, and the decoder's generation its fields came from
        self._head: RequestHead | None = None
        self._head_generation = -1

    # --- asyncio.Protocol ---
    def data_received(self, data: bytes) -> None:
        self._frames.data_received(data)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._out.append(self._opening)
        self.flush()

    # --- frames ---
    def flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _flush(self) -> None:  # the frame reader's name for it
        self.flush()

    def _wake(self, waiter: asyncio.Future[None] | None) -> None:
        wake(waiter)

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

    def _stream_error(self, stream: LeanStream, code: int, reason: str) -> None:
        """RST_STREAM(code) for a stream with a frame out of place; its handler stops."""
        log.debug("inbound HTTP/2 stream error: %s", reason)
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
        length = stop - start  # padding included; FrameReader took it from the connection window
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            self.acknowledge(stream_id, length)  # a stream that closed: ignored, credit back
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "client overran a stream window")
        if stream.remote_ended:  # §5.1 half-closed (remote)
            self.acknowledge(stream_id, length)
            self._stream_error(stream, w.STREAM_CLOSED, "client sent DATA after the end")
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
                self._stream_error(stream, w.STREAM_CLOSED, "client sent HEADERS after the end")
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
    def _check_closed_stream(self, stream_id: int) -> None:
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
            self._check_closed_stream(stream_id)
            return
        self._drop(stream)

    def _peer_setting(self, code: int, value: int) -> None:
        if code == w.SETTINGS_HEADER_TABLE_SIZE:
            self._encoder.header_table_size = value
        # MAX_CONCURRENT_STREAMS limits pushes (never sent), MAX_HEADER_LIST_SIZE is advisory

    def _settings_applied(self, opened: bool) -> None:
        if opened:
            self._windows_opened()

    def _on_settings_ack(self) -> None:
        pass  # our settings hold from the start: nothing waits for the client's ACK

    def _on_ping_ack(self, payload: bytes) -> None:
        pass  # we send no PING

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent PRIORITY on stream 0")
        if len(payload) != 5:  # §6.3: a stream error, on whatever stream it names
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._stream_error(stream, w.FRAME_SIZE_ERROR, "client sent a bad PRIORITY")
            else:
                self._refuse_new(stream_id, w.FRAME_SIZE_ERROR)
        # otherwise ignored: RFC 9113 deprecates the priority scheme, and it may name any stream

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise w.ProtocolViolation(w.PROTOCOL_ERROR, "client sent PUSH_PROMISE")
