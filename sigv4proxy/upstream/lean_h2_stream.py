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
from typing import TYPE_CHECKING

from sigv4proxy.errors import BadRequest, ProxyError, UpstreamTimeout
from sigv4proxy.upstream import h2_wire as w
from sigv4proxy.upstream.base import request_trailers
from sigv4proxy.upstream.lean_h2_recv import wake

if TYPE_CHECKING:
    from sigv4proxy.upstream.lean_h2 import LeanH2Connection

STREAM_WINDOW = 1 << 20  # per-stream receive window: what one slow consumer may have buffered


class StreamGone(Exception):
    """Internal: the stream was reset or the connection closed while we were uploading."""


def expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class LeanStream:
    """One request/response exchange; also the `ResponseBody` the Response reads from."""

    __slots__ = ("conn", "id", "head", "status", "headers", "trailers", "chunks", "remote_ended",
                 "local_ended", "sent_at", "error", "retired", "send_task", "unacked", "waiter",
                 "window_waiter", "send_window", "recv_window", "credit", "expected", "received")

    def __init__(self, conn: LeanH2Connection, stream_id: int, send_window: int,
                 head: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.head = head  # a HEAD response declares a length it never sends
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.remote_ended = False
        self.local_ended = False
        self.sent_at = 0.0
        self.error: ProxyError | None = None
        self.retired = False  # no longer counts against the connection's streams
        self.send_task: asyncio.Task[None] | None = None
        self.unacked = 0  # handed to the consumer, credit not yet counted
        self.waiter: asyncio.Future[bool] | None = None
        self.window_waiter: asyncio.Future[bool] | None = None
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.credit = 0  # consumed, stream credit not yet returned (batched)
        self.expected = -1  # content-length, -1 when absent
        self.received = 0

    def wake(self) -> None:
        wake(self.waiter)

    async def wait_event(self, timeout: float | None) -> bool:
        """False on timeout. A plain timer handle: cheaper than asyncio.timeout per wait."""
        loop = self.conn._loop
        waiter = self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, expire, waiter)
        try:
            return await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

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
            if self.remote_ended:
                return b""
            if not await self.wait_event(conn.timeouts.read):
                conn.fail_stream(self, UpstreamTimeout("upstream response body stalled"))

    async def aclose(self) -> None:
        conn = self.conn
        if self.send_task is not None and not self.send_task.done():
            self.send_task.cancel()
        if not self.retired:
            conn.reset(self, w.CANCEL)
        pending = self.unacked + sum(map(len, self.chunks))
        self.chunks.clear()
        self.unacked = 0
        if pending:
            conn.consumed(self, pending)


# --- the upload ---
async def send_body(conn: LeanH2Connection, stream: LeanStream,
                    body: bytes | AsyncIterable[bytes]) -> None:
    try:
        if isinstance(body, (bytes, bytearray, memoryview)):
            await _send_chunk(conn, stream, body)
        else:
            try:
                iterator = body.__aiter__()
            except Exception:
                raise BadRequest("request body is not iterable") from None
            while True:
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except ProxyError:
                    raise
                except Exception:
                    raise BadRequest("request body could not be read") from None
                if chunk:
                    await _send_chunk(conn, stream, chunk)
        if stream.retired or conn._closed:
            return
        trailers = request_trailers(body)
        if trailers:  # request trailers (gRPC) end the stream instead of an empty DATA frame
            block = b"".join([w.never_indexed_name(n) + w.hpack_string(v) for n, v in trailers])
            conn._write(b"".join(w.header_frames(stream.id, block, True, conn._peer_max_frame)))
        else:
            conn._write(w.frame_header(w.DATA, w.FLAG_END_STREAM, stream.id, 0))
        stream.local_ended = True
        stream.sent_at = conn._loop.time()
        if stream.remote_ended:
            conn._retire(stream)
        stream.wake()
    except StreamGone:
        pass  # the peer reset the stream (its RST_STREAM recorded why) or the connection died
    except ProxyError as err:
        if stream.remote_ended:  # the response is complete; only the upload stops
            conn.reset(stream, w.CANCEL)
        else:
            conn.fail_stream(stream, err)


async def _send_chunk(conn: LeanH2Connection, stream: LeanStream,
                      data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    offset, total = 0, len(view)
    while offset < total:
        await conn._flow.drain(conn.timeouts.read)
        if stream.error is not None:
            raise stream.error
        if stream.retired or conn._closed:
            raise StreamGone
        window = min(stream.send_window, conn._send_window)
        if window <= 0:
            if not await _wait_window(conn, stream):
                raise UpstreamTimeout("upstream flow-control window stayed closed")
            continue
        step = min(window, total - offset)
        parts: list[bytes] = []
        w.data_frames(parts, stream.id, view[offset:offset + step], False, conn._peer_max_frame)
        stream.send_window -= step
        conn._send_window -= step
        offset += step
        conn._write(b"".join(parts))


async def _wait_window(conn: LeanH2Connection, stream: LeanStream) -> bool:
    waiter = stream.window_waiter = conn._loop.create_future()
    conn._window_blocked.add(stream)
    timer = conn._loop.call_later(conn.timeouts.read, expire, waiter)
    try:
        return await waiter
    finally:
        stream.window_waiter = None
        conn._window_blocked.discard(stream)
        timer.cancel()
