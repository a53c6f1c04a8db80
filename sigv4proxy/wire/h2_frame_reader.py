"""Reading HTTP/2 frames for both lean endpoints: the receive buffer split into frames, each frame
dispatched by type, and the connection-level frames both sides answer alike (SETTINGS, PING,
WINDOW_UPDATE, GOAWAY), RFC 9113 §4, §6.5, §6.7-§6.9.

Owns: the frame loop (`data_received`: an incomplete frame carried to the next read, the frame
size limit we advertise, no other frame inside a header block, nothing but SETTINGS first, the
connection preface where the peer sends one, the dispatch by frame type, GOAWAY on a
`ProtocolViolation`), the peer's SETTINGS checked, applied and acknowledged, PING answered,
WINDOW_UPDATE checked and credited, GOAWAY parsed. Header blocks are `HeaderBlockReader`'s.
Must never: know which layer it serves (an endpoint says so as data: `peer`, `expects_preface`,
`peer_max_enable_push`, and through the hooks below), write to a socket (frames go to the
endpoint's `_out`, its `_flush` writes them), or keep reading after a connection error.

An object of its own that each endpoint holds and feeds (`FrameReader(endpoint, ...)`), not a
mixin: so an endpoint can be a compiled (mypyc) class with one base. The endpoint provides:
`_on_data` (a DATA frame on a stream, the connection window already taken), `_on_rst_stream`,
`_on_priority`, `_on_push_promise` (what a frame does there), `_on_header_block`
(HeaderBlockReader), `_check_closed_stream(stream_id)` (a frame for a stream not in the table:
fine if it closed, else a ProtocolViolation), `_stream_error(stream, code, reason)`,
`_peer_setting(code, value)` (a setting this reader does not apply), `_settings_applied(opened)`,
`_on_settings_ack()`, `_on_ping_ack(payload)`, `_windows_opened()`, `_wake(waiter)` (a stream's
window waiter), `_peer_goaway(last_stream_id, code)`, `_connection_error(code, reason)`,
`_flush()`, and the state `FrameReader` names.
"""

from __future__ import annotations

from typing import Any

from sigv4proxy.wire import h2_wire as w
from sigv4proxy.wire.h2_header_blocks import HeaderBlockReader

_unpack_header = w.FRAME_HEADER.unpack_from
_PREFACE_SIZE = len(w.PREFACE)
_RECV_MAX_FRAME_SIZE = w.DEFAULT_MAX_FRAME_SIZE  # neither endpoint advertises larger frames


class FrameReader(HeaderBlockReader):
    """Reads the frames of one lean HTTP/2 connection for its endpoint: the endpoint's
    `data_received` hands each read here. The flow-control and settings state stays the
    endpoint's (its `_send_window`, `_recv_window`, `_peer_initial_window`, `_peer_max_frame`,
    `_stream_table`, `_out`, `_closed`, `_remote_settings_seen`), which both sides share."""

    def __init__(
        self,
        endpoint: Any,
        *,
        peer: str,
        expects_preface: bool,
        peer_max_enable_push: int,
        max_header_block: int,
        block_too_large: int,
    ) -> None:
        super().__init__(endpoint, peer, max_header_block, block_too_large)
        self.expects_preface = expects_preface  # the server reads the client's preface first
        self.peer_max_enable_push = peer_max_enable_push  # a server never enables push (§6.5.2)
        self.rest = b""  # an incomplete frame (or preface) carried to the next read
        self.receiving = False  # inside data_received: writes wait for the flush at its end

    # --- the frame loop ---
    def data_received(self, data: bytes) -> None:
        ep = self.endpoint
        if ep._closed:
            return
        if self.rest:
            data = self.rest + data
            self.rest = b""
        end = len(data)
        pos = 0
        self.receiving = True
        try:
            if self.expects_preface:
                if end < _PREFACE_SIZE:
                    if data != w.PREFACE[:end]:
                        raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"bad {self.peer} preface")
                    self.rest = data
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
                if self.header_stream and frame_type != w.CONTINUATION:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} interrupted a header block")
                if frame_type == w.DATA:  # before SETTINGS it names a stream never opened: an error there
                    if stream_id == 0:
                        raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent DATA on stream 0")
                    ep._recv_window -= length  # padding included
                    if ep._recv_window < 0:
                        raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} overran the connection window")
                    ep._on_data(flags, stream_id, data, start, stop)
                elif not ep._remote_settings_seen and frame_type != w.SETTINGS:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} did not start with SETTINGS")
                elif frame_type == w.HEADERS:
                    self._on_headers(flags, stream_id, data, start, stop)
                else:
                    self._on_control(frame_type, flags, stream_id, data[start:stop])
                if ep._closed:
                    return
        except w.ProtocolViolation as err:
            ep._connection_error(err.code, err.reason)
            return
        finally:
            self.receiving = False
        if pos < end:
            self.rest = data[pos:]
        if ep._out:
            ep._flush()

    def _on_control(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        """Every frame but DATA and HEADERS, by type; an unknown type is ignored (RFC 9113 §5.5)."""
        ep = self.endpoint
        if frame_type == w.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif frame_type == w.SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif frame_type == w.RST_STREAM:
            ep._on_rst_stream(flags, stream_id, payload)
        elif frame_type == w.PING:
            self._on_ping(flags, stream_id, payload)
        elif frame_type == w.CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif frame_type == w.GOAWAY:
            self._on_goaway(stream_id, payload)
        elif frame_type == w.PRIORITY:
            ep._on_priority(flags, stream_id, payload)
        elif frame_type == w.PUSH_PROMISE:
            ep._on_push_promise(flags, stream_id, payload)

    # --- connection-level frames ---
    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        ep = self.endpoint
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent SETTINGS on a stream")
        if flags & w.FLAG_ACK:
            if payload:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a SETTINGS ACK with a payload")
            ep._on_settings_ack()
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
                delta = value - ep._peer_initial_window
                ep._peer_initial_window = value
                for stream in ep._stream_table.values():  # may go negative (§6.9.2)
                    stream.send_window += delta
                    if stream.send_window > w.MAX_WINDOW:
                        raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} overflowed a stream window")
                opened = delta > 0
            elif code == w.SETTINGS_MAX_FRAME_SIZE:
                if not w.DEFAULT_MAX_FRAME_SIZE <= value <= w.MAX_FRAME_SIZE_LIMIT:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} MAX_FRAME_SIZE out of range")
                ep._peer_max_frame = value
            else:
                ep._peer_setting(code, value)
        ep._out.append(w.SETTINGS_ACK)
        ep._remote_settings_seen = True
        ep._settings_applied(opened)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent PING on a stream")
        if len(payload) != 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad PING")
        if not flags & w.FLAG_ACK:
            self.endpoint._out.append(w.ping_ack_frame(payload))
        else:
            self.endpoint._on_ping_ack(payload)

    def _on_goaway(self, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent GOAWAY on a stream")
        if len(payload) < 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad GOAWAY")
        last_stream_id = int.from_bytes(payload[:4], "big") & w.MAX_STREAM_ID
        self.endpoint._peer_goaway(last_stream_id, int.from_bytes(payload[4:8], "big"))

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        ep = self.endpoint
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, f"{self.peer} sent a bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & w.MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, f"{self.peer} sent a zero WINDOW_UPDATE")
            ep._send_window += increment
            if ep._send_window > w.MAX_WINDOW:
                raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, f"{self.peer} overflowed the connection window")
            ep._windows_opened()
            return
        stream = ep._stream_table.get(stream_id)
        if stream is None:
            ep._check_closed_stream(stream_id)
            return
        if increment == 0:
            ep._stream_error(stream, w.PROTOCOL_ERROR, f"{self.peer} sent a zero WINDOW_UPDATE")
            return
        stream.send_window += increment
        if stream.send_window > w.MAX_WINDOW:
            ep._stream_error(stream, w.FLOW_CONTROL_ERROR, f"{self.peer} overflowed a stream window")
            return
        ep._wake(stream.window_waiter)
