"""HTTP/2 server side (h2c with prior knowledge) for inbound app connections, on the `h2` library.

Owns: the inbound h2 state of one connection (mirroring `upstream/http2.py` on the client side):
settings and windows, dispatching h2 events to its `InboundStream`s (`h2stream`: body buffering,
credit returned only as the upstream takes data, sending within windows), RST_STREAM both ways
(a client reset cancels the stream's task), one idle sweep per connection (a stream with no bytes
either way for too long is cut), write backpressure, and GOAWAY on shutdown. Also which stream
a malformed request (RFC 9113 §8.1.1) ends: only its own. Every request head and trailer block is
judged once, by `fields`; the declared content-length is held against the DATA received.
  - A malformed head gets a 400 (`malformed_request`, gRPC: trailers-only) from the stream
    handler, which raises the stream's `refusal` before anything else: nothing of it went
    upstream, and a reason tells the client what to fix (RFC 9113 §8.2.1 asks for a 400).
  - A problem found after the head (DATA beyond or short of content-length, malformed trailers,
    trailers without END_STREAM) gets RST_STREAM(PROTOCOL_ERROR): by then the head may be
    upstream and an upstream answer on its way, so a reset is the one answer that cannot be taken
    for the upstream's; the handler's body read raises the refusal, which cancels the upstream
    stream, and counts and logs it like a 400.
What RFC 9113 calls a connection error (bad preface, frame sizes, HPACK, stream ids, flow
control) still gets GOAWAY from h2 and the connection is closed.
Must never: know about AWS, routing or signing (each stream goes to a `StreamHandler`), buffer a
body whole, log header values, end a connection for one stream's malformed request, or let an h2
protocol error escape as a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

import sigv4proxy.compat.hyperframe  # noqa: F401  (h2 reprs every received frame)
from sigv4proxy.compat.h2 import ServerConnection, UnendedTrailers, keep_streams_after_goaway
from sigv4proxy.errors import MalformedRequest
from sigv4proxy.fields import request_head, trailers_problem
from sigv4proxy.inbound.h2_hpack import H2HeaderDecoder, ResponseHeaderEncoder
from sigv4proxy.inbound.h2stream import ClientGone, InboundStream, wake
from sigv4proxy.wire.h2_window import WindowQueue

log = logging.getLogger("sigv4proxy.inbound")

STREAM_WINDOW = 256 << 10  # per-stream receive window: what one stream may have buffered here
CONNECTION_WINDOW = 16 << 20
MAX_CONCURRENT_STREAMS = 256
MAX_HEADER_LIST_SIZE = 64 * 1024

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


StreamHandler = Callable[[InboundStream], Awaitable[None]]


class H2ServerConnection(asyncio.Protocol):
    """One inbound h2c connection; each request stream runs `handler(stream)` in its own task."""

    def __init__(
        self,
        handler: StreamHandler,
        *,
        idle_timeout: float = 60.0,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        on_close: Callable[[H2ServerConnection], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        # our HPACK coder in h2's slots: hpack's was the largest single cost per request
        self.h2 = ServerConnection(
            _CONFIG, encoder=ResponseHeaderEncoder(), decoder=H2HeaderDecoder(MAX_HEADER_LIST_SIZE)
        )
        # streams open at a GOAWAY finish (new ones are refused with REFUSED_STREAM by `_on_request`)
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
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, InboundStream] = {}
        self.window_queue = WindowQueue()  # responses waiting for the client's connection window
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._flush_scheduled = False
        self._goaway_sent = False
        self._sweep: asyncio.TimerHandle | None = None
        self._original_dst: tuple[str, int] | None | bool = False  # False: not looked up yet

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self._sweep = self.loop.call_later(self._sweep_interval(), self._idle_sweep)

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

    def eof_received(self) -> bool | None:
        """The client has sent all it will (TCP half-close): requests that arrived whole are still
        answered, then the connection closes; one whose body was cut short is reset (CANCEL) and
        its upstream stream cancelled."""
        for stream in list(self.streams.values()):
            if not stream.remote_ended:
                self._drop(stream, ErrorCodes.CANCEL)
        self.flush()
        if not self.streams:
            return None  # nothing left to answer: the transport closes
        self._goaway_sent = True  # as after a GOAWAY: close once the open streams finish
        return True  # keep writing

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._wake_drain()
        for stream in list(self.streams.values()):
            stream.closed = True
            wake(stream.waiter)
            wake(stream.window_waiter)
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self.window_queue.clear()
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # --- used by streams ---
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Frames that streams queue in one loop pass leave in one write (h2 keeps their order);
        with at most one stream and no write pending there is nothing to share with: it goes now."""
        if self._flush_scheduled:
            return
        if len(self.streams) <= 1:
            self.flush()
        else:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    async def drain(self) -> None:
        if self._closed:
            raise ClientGone("client connection closed")
        if not self._paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter
        if self._closed:
            raise ClientGone("client connection closed")

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self._closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self.flush_soon()

    def forget(self, stream: InboundStream) -> None:
        self.streams.pop(stream.id, None)
        if self._goaway_sent and not self.streams:
            self.close()

    def original_destination(self) -> tuple[str, int] | None:
        """SO_ORIGINAL_DST of this connection (transparent mode), looked up once."""
        if self._original_dst is False:
            from sigv4proxy.io.original_dst import original_destination

            sock = self.transport.get_extra_info("socket") if self.transport is not None else None
            self._original_dst = original_destination(sock) if sock is not None else None
        return self._original_dst  # type: ignore[return-value]

    @property
    def peername(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    # --- lifecycle ---
    @property
    def active_streams(self) -> int:
        return len(self.streams)

    def shutdown(self) -> None:
        """Graceful: GOAWAY (no new streams), close once the open streams are done."""
        if self._closed or self._goaway_sent:
            return
        self._goaway_sent = True
        try:
            self.h2.close_connection(last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()  # frames a stream queued for the scheduled flush go first
            self.transport.close()

    # --- timers ---
    def _sweep_interval(self) -> float:
        return max(0.05, min(1.0, self._idle_timeout / 4))

    def _idle_sweep(self) -> None:
        """One timer per connection: streams with no bytes either way for too long are cut."""
        self._sweep = None
        if self._closed:
            return
        deadline = self.loop.time() - self._idle_timeout
        for stream in list(self.streams.values()):
            if stream.last_activity < deadline and not stream.idle_expired and stream.task is not None:
                stream.idle_expired = True
                stream.task.cancel()  # the handler maps this to a timeout answer or a reset
        self._sweep = self.loop.call_later(self._sweep_interval(), self._idle_sweep)

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            wake(waiter)

    # --- h2 events ---
    def _on_request(self, event: h2.events.RequestReceived) -> None:
        if self._goaway_sent:
            self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        head = request_head(event.headers)
        stream = InboundStream(self, event.stream_id, head)
        if head.problem is not None:  # answered 400 by the handler; its DATA is dropped
            stream.refusal = MalformedRequest(head.problem)
        self.streams[event.stream_id] = stream
        task = self.loop.create_task(self._run(stream))
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, stream: InboundStream) -> None:
        try:
            await self._handler(stream)
        except asyncio.CancelledError:
            pass  # the client reset the stream, the connection is gone, or it went idle
        except Exception:  # a bug in the handler: never leave the stream hanging
            log.exception("inbound HTTP/2 stream handler failed")
        finally:
            if not stream.closed:
                stream.reset(ErrorCodes.INTERNAL_ERROR if not stream.local_ended else ErrorCodes.NO_ERROR)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.closed or stream.refusal is not None:
            self.acknowledge(event.stream_id, event.flow_controlled_length)  # nobody will read it
            return
        if stream.content_length >= 0:
            stream.received += len(event.data)
            if stream.received > stream.content_length:
                self._refuse(stream, "more DATA than its content-length")
                self.acknowledge(event.stream_id, event.flow_controlled_length)
                return
        stream.chunks.append((event.data, event.flow_controlled_length))
        stream.last_activity = self.loop.time()
        wake(stream.waiter)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.refusal is not None:
            return
        problem = trailers_problem(event.headers)
        if problem is not None:
            self._refuse(stream, problem)
        else:
            stream.trailers = list(event.headers)

    def _on_unended_trailers(self, event: UnendedTrailers) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:  # even one refused already: h2 took the trailers as its end
            self._refuse(stream, "trailers without END_STREAM")

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        if 0 <= stream.content_length != stream.received and stream.refusal is None:
            self._refuse(stream, "less DATA than its content-length")
            return
        stream.remote_ended = True
        wake(stream.waiter)
        if stream.local_ended:
            stream._close()

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._drop(stream)

    @staticmethod
    def _refuse(stream: InboundStream, reason: str) -> None:
        """A malformed request found after its head: RST_STREAM(PROTOCOL_ERROR) now; the handler
        raises the refusal where it is (not started yet, or reading the body) and counts it."""
        if stream.refusal is None:
            stream.refusal = MalformedRequest(reason)
        stream.reset(ErrorCodes.PROTOCOL_ERROR)

    @staticmethod
    def _drop(stream: InboundStream, code: ErrorCodes | None = None) -> None:
        """The stream ends here (reset by the client, or by us with `code`) and its handler stops."""
        task = stream.task
        if code is None:
            stream._close()
        else:
            stream.reset(code)
        if task is not None and not task.done():
            task.cancel()  # cancels the upstream stream too (its aclose resets it)

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id == 0:
            for each in self.streams.values():
                wake(each.window_waiter)
        else:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                wake(stream.window_waiter)

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in self.streams.values():
                wake(stream.window_waiter)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        # The client opens no more streams; on an error code it is gone for good.
        if event.error_code != ErrorCodes.NO_ERROR or not self.streams:
            self.close()
        else:
            self._goaway_sent = True  # close once the open streams finish


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
