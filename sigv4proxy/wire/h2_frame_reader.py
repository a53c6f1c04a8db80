"""Reading HTTP/2 frames for both lean endpoints: the receive buffer split into frames, each frame
dispatched by type, and the connection-level frames both sides answer alike (SETTINGS, PING,
WINDOW_UPDATE, GOAWAY), RFC 9113 §4, §6.5, §6.7-§6.9.

Owns: the frame loop (`data_received`: an incomplete frame carried to the next read, the frame
size limit we advertise, no other frame inside a header block, nothing but SETTINGS first, the
connection preface where the peer sends one, the dispatch table built once per class, GOAWAY on
a `ProtocolViolation`), the peer's SETTINGS checked, applied and acknowledged, PING answered,
WINDOW_UPDATE checked and credited, GOAWAY parsed. Header blocks are `HeaderBlockReader`'s.
Must never: know which layer it serves (an endpoint says so as data: `peer`, `expects_preface`,
`peer_max_enable_push`, and through the hooks below), write to a socket (frames go to `_out`,
the endpoint's `_flush` writes them), or keep reading after a connection error.

The endpoint provides: `_on_data` (a DATA frame on a stream, the connection window already
taken), `_on_rst_stream`, `_on_priority`, `_on_push_promise` (what a
frame does there), `_on_header_block` (HeaderBlockReader), `_check_closed_stream(stream_id)` (a
frame for a stream not in the table: fine if it closed, else a ProtocolViolation),
`_stream_error(stream, code, reason)`, `_peer_setting(code, value)` (a setting this reader does
not apply), `_settings_applied(opened)`, `_on_settings_ack()`, `_on_ping_ack(payload)`,
`_windows_opened()`, `_wake(waiter)` (a stream's window waiter), `_peer_goaway(last_stream_id,
code)`, `_connection_error(code, reason)`, `_flush()`, and the state named below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from sigv4proxy.wire import h2_wire as w
from sigv4proxy.wire.h2_header_blocks import HeaderBlockReader

_unpack_header = w.FRAME_HEADER.unpack_from
_PREFACE_SIZE = len(w.PREFACE)
_RECV_MAX_FRAME_SIZE = w.DEFAULT_MAX_FRAME_SIZE  # neither endpoint advertises larger frames

FrameHandler = Callable[[Any, int, int, bytes], None]  # (connection, flags, stream id, payload)


class FrameReader(HeaderBlockReader):
    """Mixin for a lean HTTP/2 connection (an asyncio.Protocol): put it first among the bases so
    its `data_received` is the one that runs."""

    expects_preface = False  # the server reads the client's preface; the client sends its own
    peer_max_enable_push = 0  # a server never enables push (§6.5.2); a client may send 0 or 1

    # The frames other than DATA and HEADERS (those two are dispatched inline), by type code: the
    # class's own functions, looked up once per class (`__init_subclass__`), called with the
    # connection, so a frame costs one dict lookup and one call, as a hand-written table did.
    _frame_handlers: ClassVar[dict[int, FrameHandler]] = {}

    # state the loop and the handlers share with the endpoint
    _closed = False  # the connection is closed: read nothing more
    _rest = b""  # an incomplete frame (or preface) carried to the next data_received
    _receiving = False  # inside data_received: writes wait for the flush at its end
    _remote_settings_seen = False  # the peer's first SETTINGS arrived
    _out: list[Any]  # frames not yet written, in order
    _stream_table: dict[int, Any]  # the endpoint's streams by id (each has send_window, window_waiter)
    _peer_initial_window: int
    _peer_max_frame: int
    _send_window: int  # the connection's send window
    _recv_window: int  # the connection's receive window (a DATA frame is taken from it before `_on_data`)
    # hooks that other bases of an endpoint may provide: declared, not defined, so that no stub
    # here hides them in the method resolution order
    _wake: Callable[[Any], None]
    _windows_opened: Callable[[], None]
    _on_ping_ack: Callable[[bytes], None]
    _peer_goaway: Callable[[int, int], None]
    _connection_error: Callable[[int, str], None]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._frame_handlers = {
            w.CONTINUATION: cls._on_continuation,
            w.RST_STREAM: cls._on_rst_stream,
            w.SETTINGS: cls._on_settings,
            w.PING: cls._on_ping,
            w.GOAWAY: cls._on_goaway,
            w.WINDOW_UPDATE: cls._on_window_update,
            w.PRIORITY: cls._on_priority,
            w.PUSH_PROMISE: cls._on_push_promise,
        }

    # --- what the endpoint provides ---
    def _flush(self) -> None:
        raise NotImplementedError

    def _on_data(self, flags: int, stream_id: int, data: bytes, start: int, stop: int) -> None:
        raise NotImplementedError

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _check_closed_stream(self, stream_id: int) -> None:
        raise NotImplementedError

    def _stream_error(self, stream: Any, code: int, reason: str) -> None:
        raise NotImplementedError

    def _peer_setting(self, code: int, value: int) -> None:
        raise NotImplementedError

    def _settings_applied(self, opened: bool) -> None:
        raise NotImplementedError

    def _on_settings_ack(self) -> None:
        raise NotImplementedError

    # --- the frame loop (asyncio.Protocol) ---
    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        end = len(data)
        pos = 0
        handlers = self._frame_handlers
        self._receiving = True
        try:
            if self.expects_preface:
                if end < _PREFACE_SIZE:
                    if data != w.PREFACE[:end]:
                        raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"bad {self.peer} preface")
                    self._rest = data
                    return
                if data[:_PREFACE_SIZE] != w.PREFACE:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"bad {self.peer} preface")
                self.expects_preface = False
                pos = _PREFACE_SIZE
            while end - pos >= 9:
                high, low, frame_type, flags, stream_id = _unpack_header(data, pos)
                length = (high << 16) | low
                if length > _RECV_MAX_FRAME_SIZE:
                    raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent an oversized frame")
                start = pos + 9
                stop = start + length
                if stop > end:
                    break
                pos = stop
                stream_id &= w.MAX_STREAM_ID
                if self._header_stream and frame_type != w.CONTINUATION:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} interrupted a header block")
                if frame_type == w.DATA:  # before SETTINGS it names a stream never opened: an error there
                    if stream_id == 0:
                        raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent DATA on stream 0")
                    self._recv_window -= length  # padding included
                    if self._recv_window < 0:
                        raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} overran the connection window")
                    self._on_data(flags, stream_id, data, start, stop)
                elif not self._remote_settings_seen and frame_type != w.SETTINGS:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} did not start with SETTINGS")
                elif frame_type == w.HEADERS:
                    self._on_headers(flags, stream_id, data, start, stop)
                else:
                    handler = handlers.get(frame_type)
                    if handler is not None:  # unknown frame types are ignored (RFC 9113 §5.5)
                        handler(self, flags, stream_id, data[start:stop])
                if self._closed:
                    return
        except w.ProtocolViolation as err:
            self._connection_error(err.code, err.reason)
            return
        finally:
            self._receiving = False
        if pos < end:
            self._rest = data[pos:]
        if self._out:
            self._flush()

    # --- connection-level frames ---
    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent SETTINGS on a stream")
        if flags & w.FLAG_ACK:
            if payload:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a SETTINGS ACK with a payload")
            self._on_settings_ack()
            return
        if len(payload) % 6:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad SETTINGS length")
        opened = False
        for code, value in w.SETTING.iter_unpack(payload):
            if code == w.SETTINGS_ENABLE_PUSH:
                if value > self.peer_max_enable_push:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent a bad ENABLE_PUSH")
            elif code == w.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > w.MAX_WINDOW:
                    raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._stream_table.values():  # may go negative (§6.9.2)
                    stream.send_window += delta
                    if stream.send_window > w.MAX_WINDOW:
                        raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} overflowed a stream window")
                opened = delta > 0
            elif code == w.SETTINGS_MAX_FRAME_SIZE:
                if not w.DEFAULT_MAX_FRAME_SIZE <= value <= w.MAX_FRAME_SIZE_LIMIT:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            else:
                self._peer_setting(code, value)
        self._out.append(w.SETTINGS_ACK)
        self._remote_settings_seen = True
        self._settings_applied(opened)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent PING on a stream")
        if len(payload) != 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad PING")
        if not flags & w.FLAG_ACK:
            self._out.append(w.ping_ack_frame(payload))
        else:
            self._on_ping_ack(payload)

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent GOAWAY on a stream")
        if len(payload) < 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad GOAWAY")
        self._peer_goaway(int.from_bytes(payload[:4], "big") & w.MAX_STREAM_ID, int.from_bytes(payload[4:8], "big"))

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & w.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent a zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > w.MAX_WINDOW:
                raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} overflowed the connection window")
            self._windows_opened()
            return
        stream = self._stream_table.get(stream_id)
        if stream is None:
            self._check_closed_stream(stream_id)
            return
        if increment == 0:
            self._stream_error(stream, w.PROTOCOL_ERROR, f"{self.peer} sent a zero WINDOW_UPDATE")
            return
        stream.send_window += increment
        if stream.send_window > w.MAX_WINDOW:
            self._stream_error(stream, w.FLOW_CONTROL_ERROR, f"{self.peer} overflowed a stream window")
            return
        self._wake(stream.window_waiter)
