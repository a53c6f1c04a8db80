"""One stream of the lean HTTP/2 connection: the response body the caller reads, and the upload.

Owns: a stream's state record, handing received chunks to the consumer while returning receive
credit only as it reads (backpressure), and sending a request body under both send windows and
the transport's write backpressure, every wait bounded by the read timeout. The connection
(`lean_h2.LeanH2Connection`) owns the windows and the socket; this module only asks it. Must
never: buffer a request body whole, pull the body iterator faster than the windows open, or turn
a broken body into a clean end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable
from functools import partial
from typing import TYPE_CHECKING

from sigv4proxy.errors import ProxyError, UpstreamError, UpstreamTimeout
from sigv4proxy.wire import h2_wire as w
from sigv4proxy.upstream.base import Interim, expire_waiter, request_trailers
from sigv4proxy.upstream.body import SocketBody
from sigv4proxy.upstream.connection_core import feed_body
from sigv4proxy.upstream.h2_common import OPEN, H2StreamBase, StreamState
from sigv4proxy.upstream.lean_h2_splice import send_frames

if TYPE_CHECKING:
    from sigv4proxy.upstream.lean_h2 import LeanH2Connection

STREAM_WINDOW = 1 << 20  # per-stream receive window: what one slow consumer may have buffered


class StreamGone(Exception):
    """Internal: the stream was reset or the connection closed while we were uploading."""


class LeanStream(H2StreamBase):
    """One request/response exchange; also the `ResponseBody` the Response reads from."""

    __slots__ = ("head", "send_window", "recv_window", "credit", "expected", "received")

    conn: LeanH2Connection
    chunks: deque[bytes]

    def __init__(self, conn: LeanH2Connection, stream_id: int, send_window: int,
                 head: bool, interim: Interim | None = None, state: StreamState = OPEN) -> None:
        super().__init__(conn, stream_id, interim, state)
        self.head = head  # a HEAD response declares a length it never sends
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.credit = 0  # consumed, stream credit not yet returned (batched)
        self.expected = -1  # content-length, -1 when absent
        self.received = 0

    async def read(self) -> bytes:
        conn = self.conn
        if self.unacked:  # the previous chunk was consumed: its credit may go back
            conn.consumed(self, self.unacked)
            self.unacked = 0
        while True:
            if self.chunks:
                data = self.chunks.popleft()
                self.unacked = len(data)
                return data
            if self.error is not None:
                raise self.error
            if self.state.remote_ended:
                return b""
            if not await self.wait_event(conn.timeouts.read):
                conn.fail_stream(self, UpstreamTimeout("upstream response body stalled"))

    def _buffered_credit(self) -> int:
        return sum(map(len, self.chunks))

    def _return_credit(self, size: int) -> None:
        self.conn.consumed(self, size)


# --- the upload ---
async def send_body(conn: LeanH2Connection, stream: LeanStream,
                    body: bytes | AsyncIterable[bytes], expect_continue: bool = False) -> None:
    try:
        if expect_continue and not await conn.hold_upload(stream):
            return  # answered on the head alone: the body is not sent (the stream is reset)
        ended = False
        taken = _taken(conn, body)
        if taken is None:
            await feed_body(body, partial(_send_chunk, conn, stream))
        elif conn._splice_fd < 0:  # TLS: `BodyReads`
            await taken.send(partial(_send_chunk, conn, stream))
        else:
            ended = await _send_spliced(conn, stream, *taken)  # its last frame ended it
        if stream.state.closed or conn.is_closed():
            return
        if not ended:
            _end_stream(conn, stream, request_trailers(body))
        conn.end_local(stream)
    except StreamGone:
        pass  # the peer reset the stream (its RST_STREAM recorded why) or the connection died
    except ProxyError as err:
        if stream.state.remote_ended:  # the response is complete; only the upload stops
            conn.reset(stream, w.CANCEL)
        else:
            conn.fail_stream(stream, err)
    finally:
        conn._window_queue.leave(stream, conn._send_window)


def _end_stream(conn: LeanH2Connection, stream: LeanStream,
                trailers: list[tuple[bytes, bytes]]) -> None:
    """Request trailers (gRPC) end the stream if there are any, else an empty DATA frame."""
    if trailers:
        block = b"".join([w.never_indexed_name(n) + w.hpack_string(v) for n, v in trailers])
        conn._write(b"".join(w.header_frames(stream.id, block, True, conn._peer_max_frame)))
    else:
        conn._write(w.frame_header(w.DATA, w.FLAG_END_STREAM, stream.id, 0))


def _taken(conn: LeanH2Connection, body: bytes | AsyncIterable[bytes]):
    """The body taken straight off the client's socket, if it is a `SocketBody`: into a cleartext
    connection (bytes already read, the rest as spliced frames or None); for TLS, which needs the
    bytes, its reads. None: send its chunks."""
    if not isinstance(body, SocketBody):
        return None
    return body.frames() if conn._splice_fd >= 0 else body.reads()


async def _send_spliced(conn: LeanH2Connection, stream: LeanStream, prefix: bytes, frames) -> bool:
    """What aiohttp had already read, as usual; then the spliced rest, if any, its last frame
    ending the stream (True). `frames.end()` whatever happens: the client's connection is
    detached until then."""
    if frames is None:
        if prefix:
            await _send_chunk(conn, stream, prefix)
        return False
    complete = upstream_gave_up = False
    try:
        if prefix:
            await _send_chunk(conn, stream, prefix)
        await send_frames(conn, stream, frames.source, partial(_window, conn, stream), StreamGone)
        complete = True
        return True
    except (StreamGone, UpstreamError, asyncio.CancelledError):
        upstream_gave_up = True  # the client may still be sending: its rest is read and dropped
        raise
    finally:
        frames.end(complete, upstream_gave_up)


async def _send_chunk(conn: LeanH2Connection, stream: LeanStream,
                      data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    offset, total = 0, len(view)
    while offset < total:
        window = await _window(conn, stream)
        step = min(window, total - offset)
        parts: list[bytes] = []
        w.data_frames(parts, stream.id, view[offset:offset + step], False, conn._peer_max_frame)
        stream.send_window -= step
        conn._send_window -= step
        offset += step
        conn._writelines(parts)
        conn._window_queue.sent(conn._send_window)


async def _window(conn: LeanH2Connection, stream: LeanStream) -> int:
    """Waits until `stream` may send (write backpressure, both windows open, its turn for the
    connection window) and returns how much; StreamGone or a typed error if it cannot."""
    while True:
        await conn._flow.drain(conn.timeouts.read)
        if stream.error is not None:
            raise stream.error
        if stream.state.closed or conn.is_closed():
            raise StreamGone
        window = min(stream.send_window, conn._send_window)
        if conn._window_queue.may_send(stream, window, conn._send_window):
            return window
        if not await _wait_window(conn, stream):
            raise UpstreamTimeout("upstream flow-control window stayed closed")


async def _wait_window(conn: LeanH2Connection, stream: LeanStream) -> bool:
    waiter = stream.window_waiter = conn.loop.create_future()
    conn._window_blocked.add(stream)
    timer = conn.loop.call_later(conn.timeouts.read, expire_waiter, waiter)
    try:
        return await waiter
    finally:
        stream.window_waiter = None
        conn._window_blocked.discard(stream)
        timer.cancel()
