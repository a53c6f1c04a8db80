"""The receiving half of the lean HTTP/2 connection: what each incoming frame does.

Owns: the per-frame-type rules of RFC 9113 for a client (DATA, HEADERS/CONTINUATION, RST_STREAM,
SETTINGS, PING, GOAWAY, WINDOW_UPDATE, PRIORITY, PUSH_PROMISE), receive-side flow-control
accounting, response header decoding through `hpack_decode.HeaderBlockDecoder` (which tracks the
peer's dynamic table), and the choice between a stream error (RST_STREAM) and a connection error
(GOAWAY). A mixin of `lean_h2.LeanH2Connection`, which owns the state these handlers update. Must
never: write to the socket directly (frames go to `_out`, flushed once per read), block, or quote
a header value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sigv4proxy.errors import ProxyError, UpstreamProtocolError
from sigv4proxy.wire import h2_wire as w
from sigv4proxy.upstream.base import OnChange, wake
from sigv4proxy.upstream.h2_common import HALF_CLOSED_REMOTE, StreamState, status_code
from sigv4proxy.wire.hpack_decode import (BLOCK_CACHE_ENTRIES, HeaderBlockDecoder,
                                               HpackDecodeError, decodes_alike)

if TYPE_CHECKING:
    from sigv4proxy.upstream.lean_h2_stream import LeanStream as _Stream

MAX_HEADER_BLOCK = 256 << 10  # encoded block across CONTINUATION frames (flood guard)
_NO_BODY_STATUSES = (204, 304)
# A response head whose block decodes alike everywhere (a server repeats one within a second) is
# checked once: block -> check_fields' verdict, its field list kept as a tuple (each stream gets
# its own list). Only such blocks are stored, so a hit needs no second look at the decode cache.
# Cleared when full, as the decode cache is. Refused blocks are never stored.
_checked_heads: dict[bytes, tuple[bytes | None, tuple, int]] = {}


class ProtocolViolation(Exception):
    """Internal: stop reading frames; the connection dies with GOAWAY(code)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameReceiver:
    """Frame handlers; `data_received` in LeanH2Connection slices frames and dispatches here."""

    if TYPE_CHECKING:  # state owned by LeanH2Connection
        _streams: dict[int, _Stream]
        _next_stream_id: int
        _recv_window: int
        _send_window: int
        _window_blocked: set[_Stream]
        _out: list[bytes]
        _decoder: HeaderBlockDecoder
        _encoder: w.RequestHeaderEncoder
        _header_stream: int
        _header_parts: list[bytes]
        _header_size: int
        _header_end_stream: bool
        _peer_max_streams: int
        _peer_initial_window: int
        _peer_max_frame: int
        _peer_max_header_list: int | None
        _remote_settings_seen: bool
        _local_settings_acked: bool
        _on_change: OnChange

        def consumed(self, stream: _Stream, size: int) -> None: ...
        def _connection_consumed(self, size: int) -> None: ...
        def reset(self, stream: _Stream, code: int) -> None: ...
        def fail_stream(self, stream: _Stream, err: ProxyError, code: int = ...) -> None: ...
        def _move(self, stream: _Stream, state: StreamState) -> None: ...
        def _check_ready(self) -> None: ...
        def _peer_reset(self, stream: _Stream, code: int, code_name: object) -> None: ...
        def _peer_goaway(self, last_stream_id: int) -> None: ...

    # --- helpers ---
    def _check_closed_stream(self, stream_id: int) -> None:
        """A frame for a stream not in the table: fine if it was ours and is closed now."""
        if stream_id == 0 or not stream_id & 1 or stream_id >= self._next_stream_id:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream used a stream we never opened")

    def _stream_error(self, stream: _Stream, code: int, reason: str) -> None:
        self.fail_stream(stream, UpstreamProtocolError(reason), code)

    def _return_connection_credit(self, size: int) -> None:
        """Bytes nobody will read (closed stream, padding): give the connection credit back."""
        if size:
            self._connection_consumed(size)

    def _remote_end(self, stream: _Stream) -> None:
        if (stream.expected >= 0 and stream.received != stream.expected and not stream.head
                and stream.status not in _NO_BODY_STATUSES):
            self._stream_error(stream, w.PROTOCOL_ERROR,
                               "upstream body length differs from content-length")
            return
        self._move(stream, stream.state.on_remote_end)
        stream.wake()

    # --- DATA ---
    def _on_data(self, flags: int, stream_id: int, data: bytes, start: int, stop: int) -> None:
        length = stop - start  # flow-controlled length, padding included
        if stream_id == 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent DATA on stream 0")
        self._recv_window -= length
        if self._recv_window < 0:
            raise ProtocolViolation(w.FLOW_CONTROL_ERROR, "upstream overran the connection window")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            self._return_connection_credit(length)
            return
        padding = 0
        if flags & w.FLAG_PADDED:
            if length == 0 or data[start] >= length:
                raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent bad DATA padding")
            padding = data[start] + 1
            payload = data[start + 1:stop - data[start]]
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
            self._stream_error(stream, w.PROTOCOL_ERROR,
                               "upstream sent DATA outside a response body")
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

    # --- HEADERS / CONTINUATION ---
    def _on_headers(self, flags: int, stream_id: int, data: bytes, start: int, stop: int) -> None:
        if stream_id == 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent HEADERS on stream 0")
        if flags & w.FLAG_PADDED:
            if start == stop:
                raise ProtocolViolation(w.FRAME_SIZE_ERROR,
                                        "upstream sent a truncated HEADERS frame")
            pad = data[start]
            start += 1
            if pad > stop - start:
                raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent bad HEADERS padding")
            stop -= pad
        if flags & w.FLAG_PRIORITY:
            start += 5
            if start > stop:
                raise ProtocolViolation(w.FRAME_SIZE_ERROR,
                                        "upstream sent a truncated HEADERS frame")
        block = data[start:stop]
        end_stream = bool(flags & w.FLAG_END_STREAM)
        if flags & w.FLAG_END_HEADERS:
            self._on_header_block(stream_id, block, end_stream)
        else:
            self._header_stream = stream_id
            self._header_parts = [block]
            self._header_size = len(block)
            self._header_end_stream = end_stream

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not self._header_stream or stream_id != self._header_stream:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent an unexpected CONTINUATION")
        self._header_parts.append(payload)
        self._header_size += len(payload)
        if self._header_size > MAX_HEADER_BLOCK:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream header block too large")
        if flags & w.FLAG_END_HEADERS:
            block = b"".join(self._header_parts)
            self._header_stream = 0
            self._header_parts = []
            self._on_header_block(stream_id, block, self._header_end_stream)

    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        if not stream_id & 1 or stream_id >= self._next_stream_id:
            self._check_closed_stream(stream_id)  # a push or an idle stream: connection error
        try:  # always decode, even for a closed stream: the peer's table must stay in step
            fields = self._decoder.decode(block)
        except HpackDecodeError:
            raise ProtocolViolation(w.COMPRESSION_ERROR,
                                    "upstream sent an undecodable header block") from None
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
                self._stream_error(stream, w.PROTOCOL_ERROR,
                                   f"upstream sent a malformed response: {bad}")
                return
            if head and decodes_alike(block):  # a property of the bytes: stays true once true
                if len(_checked_heads) >= BLOCK_CACHE_ENTRIES:
                    _checked_heads.clear()
                _checked_heads[block] = (status, tuple(headers), content_length)
        if not head:  # trailers
            if not end_stream:
                self._stream_error(stream, w.PROTOCOL_ERROR,
                                   "upstream trailers did not end the stream")
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
                self._stream_error(stream, w.PROTOCOL_ERROR,
                                   "upstream sent a bad informational response")
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

    # --- control frames ---
    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent a bad RST_STREAM")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            return
        code = int.from_bytes(payload, "big")
        self._peer_reset(stream, code, w.ERROR_NAMES.get(code, code))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent SETTINGS on a stream")
        if flags & w.FLAG_ACK:
            if payload:
                raise ProtocolViolation(w.FRAME_SIZE_ERROR,
                                        "upstream sent a SETTINGS ACK with a payload")
            self._local_settings_acked = True
            self._check_ready()
            return
        if len(payload) % 6:
            raise ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent a bad SETTINGS length")
        for offset in range(0, len(payload), 6):
            code = int.from_bytes(payload[offset:offset + 2], "big")
            value = int.from_bytes(payload[offset + 2:offset + 6], "big")
            if code == w.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.peer_table_size_changed()
            elif code == w.SETTINGS_ENABLE_PUSH:
                if value != 0:  # RFC 9113 §6.5.2: a server never enables push
                    raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent ENABLE_PUSH")
            elif code == w.SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif code == w.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > w.MAX_WINDOW:
                    raise ProtocolViolation(w.FLOW_CONTROL_ERROR,
                                            "upstream INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():  # may go negative (§6.9.2)
                    stream.send_window += delta
                    if stream.send_window > w.MAX_WINDOW:
                        raise ProtocolViolation(w.FLOW_CONTROL_ERROR,
                                                "upstream overflowed a stream window")
            elif code == w.SETTINGS_MAX_FRAME_SIZE:
                if not w.DEFAULT_MAX_FRAME_SIZE <= value <= w.MAX_FRAME_SIZE_LIMIT:
                    raise ProtocolViolation(w.PROTOCOL_ERROR,
                                            "upstream MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif code == w.SETTINGS_MAX_HEADER_LIST_SIZE:
                self._peer_max_header_list = value
        self._out.append(w.SETTINGS_ACK)
        for stream in list(self._window_blocked):
            wake(stream.window_waiter)
        self._remote_settings_seen = True
        self._check_ready()
        self._on_change(self)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent PING on a stream")
        if len(payload) != 8:
            raise ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent a bad PING")
        if not flags & w.FLAG_ACK:
            self._out.append(w.ping_ack_frame(payload))
        else:
            self._on_ping_ack(payload)

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent GOAWAY on a stream")
        if len(payload) < 8:
            raise ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent a bad GOAWAY")
        self._peer_goaway(int.from_bytes(payload[:4], "big") & w.MAX_STREAM_ID)

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(w.FRAME_SIZE_ERROR, "upstream sent a bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & w.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent a zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > w.MAX_WINDOW:
                raise ProtocolViolation(w.FLOW_CONTROL_ERROR,
                                        "upstream overflowed the connection window")
            for stream in list(self._window_blocked):
                wake(stream.window_waiter)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            return
        if increment == 0:
            self._stream_error(stream, w.PROTOCOL_ERROR, "upstream sent a zero WINDOW_UPDATE")
            return
        stream.send_window += increment
        if stream.send_window > w.MAX_WINDOW:
            self._stream_error(stream, w.FLOW_CONTROL_ERROR, "upstream overflowed a stream window")
            return
        wake(stream.window_waiter)

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream sent PRIORITY on stream 0")
        if len(payload) != 5:
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._stream_error(stream, w.FRAME_SIZE_ERROR, "upstream sent a bad PRIORITY")

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise ProtocolViolation(w.PROTOCOL_ERROR, "upstream pushed although push is disabled")


FRAME_HANDLERS: dict[int, Callable[..., None]] = {
    w.CONTINUATION: FrameReceiver._on_continuation,
    w.RST_STREAM: FrameReceiver._on_rst_stream,
    w.SETTINGS: FrameReceiver._on_settings,
    w.PING: FrameReceiver._on_ping,
    w.GOAWAY: FrameReceiver._on_goaway,
    w.WINDOW_UPDATE: FrameReceiver._on_window_update,
    w.PRIORITY: FrameReceiver._on_priority,
    w.PUSH_PROMISE: FrameReceiver._on_push_promise,
}
