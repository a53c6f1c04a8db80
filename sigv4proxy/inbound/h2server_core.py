"""What both inbound HTTP/2 servers share: one h2c connection's streams, tasks and life, whoever
parses its frames (`h2server_lean`, our own, the default; `h2server`, the `h2` library, the
reference behind the same tests).

Owns: the stream table and each request stream's task (a stream's handler runs in its own task,
cancelled when the client resets it or the connection goes), what a request's head, DATA, trailers
and end do to its `InboundStream` (a malformed request, RFC 9113 §8.1.1, ends only its own stream:
  - a malformed head gets a 400 (`malformed_request`, gRPC: trailers-only) from the stream
    handler, which raises the stream's `refusal` before anything else: nothing of it went
    upstream, and a reason tells the client what to fix (RFC 9113 §8.2.1 asks for a 400);
  - a problem found after the head (DATA beyond or short of content-length, malformed trailers,
    trailers without END_STREAM) gets RST_STREAM(PROTOCOL_ERROR): by then the head may be
    upstream and an upstream answer on its way, so a reset is the one answer that cannot be taken
    for the upstream's; the handler's body read raises the refusal, which cancels the upstream
    stream, and counts and logs it like a 400),
new streams refused (REFUSED_STREAM) once GOAWAY went out, the client's half-close, one idle sweep
per connection (a stream with no bytes either way for too long is cut), write backpressure, the
batching of what streams queue in one loop pass into one write, and the graceful shutdown. Every
request head and trailer block is judged once, by `fields`.
A subclass owns the frames: `flush`, `acknowledge`, the GOAWAY of `shutdown`, and the calls an
`InboundStream` answers with (`send_headers`, `send_data`, `reset_stream`, `window`,
`connection_window`, `max_frame_size`), which raise `ClientGone` for a stream that cannot take more.
Must never: know about AWS, routing or signing (each stream goes to a `StreamHandler`), buffer a
body whole, log header values, end a connection for one stream's malformed request, or let a
protocol error escape as a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sigv4proxy.compat.mypyc import mypyc_attr
from sigv4proxy.errors import MalformedRequest
from sigv4proxy.fields import RequestHead, request_head, trailers_problem
from sigv4proxy.inbound.h2stream import ClientGone, InboundStream, wake
from sigv4proxy.wire import h2_wire as w
from sigv4proxy.wire.h2_window import WindowQueue

log = logging.getLogger("sigv4proxy.inbound")

STREAM_WINDOW = 256 << 10  # per-stream receive window: what one stream may have buffered here
CONNECTION_WINDOW = 16 << 20
MAX_CONCURRENT_STREAMS = 256
MAX_HEADER_LIST_SIZE = 64 * 1024

# Called once per stream; the awaitable it returns runs as the stream's task.
StreamHandler = Callable[[InboundStream], Coroutine[Any, Any, None]]


@mypyc_attr(allow_interpreted_subclasses=True)  # the `h2` reference server subclasses it in Python
class H2ServerBase:
    """One inbound h2c connection; each request stream runs `handler(stream)` in its own task. Its
    transport's protocol by its methods: without asyncio.Protocol as a base, compiled, it is a
    native class."""

    stream_class: type[InboundStream] = InboundStream

    def __init__(
        self,
        handler: StreamHandler,
        *,
        idle_timeout: float = 60.0,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        on_close: Callable[[H2ServerBase], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._max_streams = max_concurrent_streams
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, InboundStream] = {}
        self.window_queue = WindowQueue()  # responses waiting for the client's connection window
        self._tasks: dict[asyncio.Task[None], InboundStream] = {}  # held until done: the loop holds tasks weakly
        self._task_done = self._stream_done
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._flush_scheduled = False
        self._goaway_sent = False
        self.peer_eof = False  # the client sent its last byte: no WINDOW_UPDATE can come any more
        self._sweep: asyncio.TimerHandle | None = None
        self._original_dst: tuple[str, int] | None | bool = False  # False: not looked up yet

    # --- what a subclass provides ---
    def data_received(self, data: bytes) -> None:
        """The transport's bytes: the subclass reads its frames."""
        raise NotImplementedError

    def flush(self) -> None:
        """Writes the frames queued so far."""
        raise NotImplementedError

    def acknowledge(self, stream_id: int, size: int) -> None:
        """`size` flow-controlled bytes of `stream_id` were taken (or dropped): credit may go back."""
        raise NotImplementedError

    def _send_goaway(self) -> None:
        """Queues GOAWAY(NO_ERROR) naming the last stream the client opened."""
        raise NotImplementedError

    def _refuse_new(self, stream_id: int, code: int) -> None:
        """Queues RST_STREAM for a stream that never got an `InboundStream`."""
        raise NotImplementedError

    def send_headers(self, stream: InboundStream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """Queues a header block (response head, 1xx or trailers) on `stream`."""
        raise NotImplementedError

    def send_data(self, stream: InboundStream, data: bytes | memoryview, end_stream: bool) -> None:
        """Queues one DATA frame, at most `window(stream)` and `max_frame_size` bytes."""
        raise NotImplementedError

    def reset_stream(self, stream: InboundStream, code: int) -> None:
        """Queues RST_STREAM(code) on `stream` (the stream closes itself)."""
        raise NotImplementedError

    def window(self, stream: InboundStream) -> int:
        """What `stream` may send now: the smaller of its window and the connection's."""
        raise NotImplementedError

    @property
    def connection_window(self) -> int:
        raise NotImplementedError

    @property
    def max_frame_size(self) -> int:
        raise NotImplementedError

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sweep = self.loop.call_later(self._sweep_interval(), self._idle_sweep)

    def eof_received(self) -> bool | None:
        """The client has sent all it will (TCP half-close): requests that arrived whole are still
        answered, then the connection closes; one whose body was cut short is reset (CANCEL) and
        its upstream stream cancelled. No window can open after it: a stream waiting for one is
        woken to find that out (reset, CANCEL), so nothing waits on a client that left."""
        self.peer_eof = True
        for stream in list(self.streams.values()):
            if not stream.remote_ended:
                self._drop(stream, w.CANCEL)
        self._windows_opened()
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
    def flush_soon(self) -> None:
        """Frames that streams queue in one loop pass leave in one write (in the order queued);
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

    @property
    def must_drain(self) -> bool:
        """`drain` would wait or raise: only then is it worth a coroutine."""
        return self._paused or self._closed

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
        self._send_goaway()
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

    # --- what the client's frames do to streams ---
    def _open_stream(self, stream_id: int, fields: list[tuple[bytes, bytes]]) -> InboundStream | None:
        """A request head arrived on a new stream: its stream and task (None: refused)."""
        if self._goaway_sent:
            self._refuse_new(stream_id, w.REFUSED_STREAM)
            return None
        head = self._judge(fields)
        stream = self.stream_class(self, stream_id, head)
        if head.problem is not None:  # answered 400 by the handler; its DATA is dropped
            stream.refusal = MalformedRequest(head.problem)
        self.streams[stream_id] = stream
        # the handler's awaitable is the task itself: no wrapper coroutine per request
        task = self.loop.create_task(self._handler(stream))
        stream.task = task
        self._tasks[task] = stream
        task.add_done_callback(self._task_done)
        return stream

    def _judge(self, fields: list[tuple[bytes, bytes]]) -> RequestHead:
        """The request head `fields` make (a subclass may reuse its judgement of the same fields)."""
        return request_head(fields)

    def _stream_done(self, task: asyncio.Task[None]) -> None:
        stream = self._tasks.pop(task)
        # cancelled: the client reset the stream, the connection is gone, or it went idle
        if not task.cancelled() and task.exception() is not None:  # a bug in the handler
            log.error("inbound HTTP/2 stream handler failed", exc_info=task.exception())
        if not stream.closed:  # never leave the stream hanging
            stream.reset(w.INTERNAL_ERROR if not stream.local_ended else w.NO_ERROR)

    def _received_data(self, stream: InboundStream, data: bytes, flow_length: int) -> None:
        if stream.closed or stream.refusal is not None:
            self.acknowledge(stream.id, flow_length)  # nobody will read it
            return
        if stream.content_length >= 0:
            stream.received += len(data)
            if stream.received > stream.content_length:
                self._refuse(stream, "more DATA than its content-length")
                self.acknowledge(stream.id, flow_length)
                return
        stream.chunks.append((data, flow_length))
        stream.last_activity = self.loop.time()
        wake(stream.waiter)

    def _received_trailers(self, stream: InboundStream, fields: list[tuple[bytes, bytes]]) -> None:
        if stream.refusal is not None:
            return
        problem = trailers_problem(fields)
        if problem is not None:
            self._refuse(stream, problem)
        else:
            stream.trailers = list(fields)

    def _remote_ended(self, stream: InboundStream) -> None:
        if 0 <= stream.content_length != stream.received and stream.refusal is None:
            self._refuse(stream, "less DATA than its content-length")
            return
        stream.remote_ended = True
        wake(stream.waiter)
        if stream.local_ended:
            stream._close()

    @staticmethod
    def _refuse(stream: InboundStream, reason: str) -> None:
        """A malformed request found after its head: RST_STREAM(PROTOCOL_ERROR) now; the handler
        raises the refusal where it is (not started yet, or reading the body) and counts it."""
        if stream.refusal is None:
            stream.refusal = MalformedRequest(reason)
        stream.reset(w.PROTOCOL_ERROR)

    @staticmethod
    def _drop(stream: InboundStream, code: int | None = None) -> None:
        """The stream ends here (reset by the client, or by us with `code`) and its handler stops."""
        task = stream.task
        if code is None:
            stream._close()
        else:
            stream.reset(code)
        if task is not None and not task.done():
            task.cancel()  # cancels the upstream stream too (its aclose resets it)

    def _windows_opened(self) -> None:
        """The connection's send window (or every stream's) grew: waiting streams look again."""
        for each in self.streams.values():
            wake(each.window_waiter)

    def _peer_goaway(self, last_stream_id: int, error_code: int) -> None:
        # The client opens no more streams; on an error code it is gone for good.
        if error_code != w.NO_ERROR or not self.streams:
            self.close()
        else:
            self._goaway_sent = True  # close once the open streams finish
