"""The reference inbound HTTP/2 server (h2c with prior knowledge), on the `h2` library
(`--h2-server-implementation h2`; the default is our own, `h2server_lean`, and both pass the same
inbound tests).

Owns: one `h2` server connection (settings and windows, frames parsed and built by the library,
our HPACK coder from `h2_hpack` in its slots) and the translation of its events into what
`h2server_core` does to a connection's streams, and of a stream's answer into h2's calls. What
RFC 9113 calls a connection error (bad preface, frame sizes, HPACK, stream ids, flow control, too
many streams) gets GOAWAY from h2 and the connection is closed; a malformed request stays a stream
error (`compat.h2.ServerConnection`). Must never: know about AWS, routing or signing, log header
values, or let an h2 protocol error escape as a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import h2.config
import h2.events
import h2.exceptions
import h2.settings

import sigv4proxy.compat.hyperframe  # noqa: F401  (h2 reprs every received frame)
from sigv4proxy.compat.h2 import ServerConnection, UnendedTrailers, keep_streams_after_goaway
from sigv4proxy.inbound.h2_hpack import H2HeaderDecoder, ResponseHeaderEncoder
from sigv4proxy.inbound.h2server_core import (
    CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    H2ServerBase,
    StreamHandler,
)
from sigv4proxy.inbound.h2stream import ClientGone, InboundStream, wake

__all__ = ["H2ServerConnection", "STREAM_WINDOW"]

log = logging.getLogger("sigv4proxy.inbound")

_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # Inbound fields are judged by `fields.request_head` / `trailers_problem` instead, so that a
    # malformed request is refused on its own stream (h2 would end the connection).
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    # Outbound: names are lowercased by the caller; values pass exactly as the upstream sent them.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    split_outbound_cookies=False,
)


class H2ServerConnection(H2ServerBase):
    """One inbound h2c connection on the `h2` library."""

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
        # our HPACK coder in h2's slots: hpack's was the largest single cost per request
        self.h2 = ServerConnection(
            _CONFIG, encoder=ResponseHeaderEncoder(), decoder=H2HeaderDecoder(MAX_HEADER_LIST_SIZE)
        )
        # streams open at a GOAWAY finish (new ones are refused with REFUSED_STREAM by `_open_stream`)
        keep_streams_after_goaway(self.h2)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )

    # --- asyncio.Protocol ---
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("inbound HTTP/2 protocol error: %s", type(exc).__name__)
            self.flush()  # h2 queued a GOAWAY for the client
            self.close()
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        self.flush()

    # --- frames ---
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self._closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self.flush_soon()

    def _send_goaway(self) -> None:
        try:
            self.h2.close_connection(last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass

    def _refuse_new(self, stream_id: int, code: int) -> None:
        self.h2.reset_stream(stream_id, code)

    # --- what a stream answers with ---
    def send_headers(self, stream: InboundStream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        try:
            self.h2.send_headers(stream.id, fields, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("client stream closed") from None

    def send_data(self, stream: InboundStream, data: bytes | memoryview, end_stream: bool) -> None:
        try:
            self.h2.send_data(stream.id, data, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("client stream closed") from None

    def reset_stream(self, stream: InboundStream, code: int) -> None:
        try:
            self.h2.reset_stream(stream.id, code)
        except h2.exceptions.ProtocolError:
            pass

    def window(self, stream: InboundStream) -> int:
        return self.h2.local_flow_control_window(stream.id)

    @property
    def connection_window(self) -> int:
        return self.h2.outbound_flow_control_window

    @property
    def max_frame_size(self) -> int:
        return self.h2.max_outbound_frame_size

    # --- h2 events ---
    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self._open_stream(event.stream_id, event.headers)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            self.acknowledge(event.stream_id, event.flow_controlled_length)  # nobody will read it
        else:
            self._received_data(stream, event.data, event.flow_controlled_length)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._received_trailers(stream, event.headers)

    def _on_unended_trailers(self, event: UnendedTrailers) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:  # even one refused already: h2 took the trailers as its end
            self._refuse(stream, "trailers without END_STREAM")

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._remote_ended(stream)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._drop(stream)

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id == 0:
            self._windows_opened()
        else:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                wake(stream.window_waiter)

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._windows_opened()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._peer_goaway(event.last_stream_id or 0, event.error_code or 0)


_HANDLERS: dict[type, Callable[[H2ServerConnection, Any], None]] = {
    h2.events.RequestReceived: H2ServerConnection._on_request,
    h2.events.DataReceived: H2ServerConnection._on_data,
    h2.events.TrailersReceived: H2ServerConnection._on_trailers,
    UnendedTrailers: H2ServerConnection._on_unended_trailers,
    h2.events.StreamEnded: H2ServerConnection._on_stream_ended,
    h2.events.StreamReset: H2ServerConnection._on_stream_reset,
    h2.events.WindowUpdated: H2ServerConnection._on_window_updated,
    h2.events.RemoteSettingsChanged: H2ServerConnection._on_settings,
    h2.events.ConnectionTerminated: H2ServerConnection._on_goaway,
}
