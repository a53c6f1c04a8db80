"""One inbound HTTP/2 stream as the request path sees it: its request head, body and trailers,
and the calls that answer it.

Owns: per-stream request-body buffering with flow control (a chunk's credit goes back to the
client only when the next chunk is pulled, i.e. once the upstream took it), sending within the
client's windows and the connection's write buffer, the stream's close/reset bookkeeping, and its
`refusal`: the MalformedRequest the connection found (in the head, the body length or the
trailers) that the request path raises instead of proxying, and that `read` raises mid-body.
Frames are the connection's (`h2server_core`: either server, ours or the `h2` library's): a stream
calls `send_headers`, `send_data`, `reset_stream`, `window` on it. Must never: touch the socket
itself, buffer more than the stream window, hand on a body whose stream was refused, or log header
values.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from sigv4proxy.compat.mypyc import mypyc_attr
from sigv4proxy.wire.h2_wire import CANCEL, NO_ERROR

if TYPE_CHECKING:
    from sigv4proxy.errors import MalformedRequest
    from sigv4proxy.fields import RequestHead
    from sigv4proxy.inbound.h2server_core import H2ServerBase

READ_COALESCE = 64 * 1024  # bytes: buffered request frames joined into one chunk up to this


@mypyc_attr(native_class=False)  # compiled, a subclass of ConnectionError cannot be a native class
class ClientGone(ConnectionError):
    """The client reset the stream or the connection is gone: nothing more can be sent."""


def wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class InboundStream:
    """One request stream from the app; iterate `body` for its data, answer with the send methods."""

    __slots__ = (
        "conn",
        "id",
        "method",
        "path",
        "authority",
        "scheme",
        "headers",
        "trailers",
        "chunks",
        "remote_ended",
        "closed",
        "unacked",
        "waiter",
        "window_waiter",
        "task",
        "last_activity",
        "idle_expired",
        "response_started",
        "local_ended",
        "content_length",
        "received",
        "refusal",
        "continued",
    )

    def __init__(self, conn: H2ServerBase, stream_id: int, head: RequestHead) -> None:
        self.conn = conn
        self.id = stream_id
        self.method = head.method or b""
        self.path = head.path or b""
        self.authority = head.authority
        self.scheme = head.scheme or b""
        self.headers = head.headers  # regular fields, in arrival order
        self.content_length = head.content_length  # -1: none declared
        self.received = 0  # DATA bytes so far, counted while a content-length is declared
        self.refusal: MalformedRequest | None = None
        self.trailers: list[tuple[bytes, bytes]] = []  # request trailers, once they arrived
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.remote_ended = False
        self.closed = False  # reset (either side) or fully done: no more frames for it
        self.local_ended = False
        self.unacked = 0
        self.waiter: asyncio.Future[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_activity = conn.loop.time()
        self.idle_expired = False
        self.response_started = False
        self.continued = False  # a 100 (Continue) went to the client

    # --- request body ---
    def has_body(self) -> bool:
        return not (self.remote_ended and not self.chunks)

    def whole_body(self, limit: int) -> bytes | None:
        """The whole body if it has all arrived (without trailers) and is at most `limit` bytes,
        else None (then read() streams it). Its flow-control credit goes back now."""
        chunks = self.chunks
        if not self.remote_ended or self.trailers or self.unacked:
            return None
        if not chunks:  # a GET's
            return b""
        if len(chunks) == 1:  # the usual small body: one DATA frame, in the read of its HEADERS
            body, credit = chunks[0]
            if len(body) > limit:
                return None
        else:
            if sum(len(data) for data, _ in chunks) > limit:
                return None
            body = b"".join([data for data, _ in chunks])
            credit = sum(flow for _, flow in chunks)
        chunks.clear()
        if credit:
            self.conn.acknowledge(self.id, credit)
        return body

    async def read(self) -> bytes:
        """The next chunk of the request body, b"" at its end. Returns the previous chunk's credit."""
        conn = self.conn
        if self.unacked:
            conn.acknowledge(self.id, self.unacked)
            self.unacked = 0
        while True:
            if self.refusal is not None:  # never let a refused body end as if it were whole
                raise self.refusal
            chunks = self.chunks
            if chunks:
                data, flow_length = chunks.popleft()
                if not data:  # padding only
                    conn.acknowledge(self.id, flow_length)
                    continue
                if chunks and len(data) < READ_COALESCE:
                    data, flow_length = self._coalesce(data, flow_length)
                self.unacked = flow_length
                return data
            if self.remote_ended:
                return b""
            if self.closed:
                raise ClientGone("client stream closed")
            waiter = self.waiter = conn.loop.create_future()
            try:
                await waiter
            finally:
                self.waiter = None

    def _coalesce(self, data: bytes, flow_length: int) -> tuple[bytes, int]:
        """Frames already buffered leave as one chunk (up to READ_COALESCE): one upstream write
        instead of one per 16 KiB frame, for one copy of bytes that are in cache anyway."""
        parts, size, chunks = [data], len(data), self.chunks
        while chunks and size < READ_COALESCE:
            more, more_flow = chunks.popleft()
            parts.append(more)
            size += len(more)
            flow_length += more_flow
        return b"".join(parts), flow_length

    # --- response ---
    def send_headers(self, fields: list[tuple[bytes, bytes]], end_stream: bool = False, flush: bool = True) -> None:
        """Response head (with `:status` first) or, once started, trailers (then end_stream).
        `flush=False` leaves the frame for the next send's write (data that is already here)."""
        if self.closed or self.local_ended:
            raise ClientGone("client stream closed")
        self.response_started = True
        self.conn.send_headers(self, fields, end_stream)
        if end_stream:
            self.local_ended = True
        self.last_activity = self.conn.loop.time()
        if flush or end_stream:
            self.conn.flush_soon()
        if end_stream:
            self._finish()

    def send_informational(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        """A 1xx response ahead of the final head (RFC 9110 §15.2); the response has not started:
        an error after it still gets a proper answer."""
        if self.closed or self.local_ended:
            raise ClientGone("client stream closed")
        self.conn.send_headers(self, [(b":status", b"%d" % status), *fields], False)
        if status == 100:
            self.continued = True
        self.last_activity = self.conn.loop.time()
        self.conn.flush_soon()

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        """Sends within the client's flow-control windows and the transport's write buffer."""
        conn = self.conn
        total = len(data)
        if (
            0 < total <= conn.max_frame_size
            and not self.closed
            and not conn.must_drain
            and not conn.window_queue
            and conn.window(self) >= total
        ):  # the usual answer: all of it in one frame, now (what one turn of the loop below does)
            conn.send_data(self, data, end_stream)
            self.last_activity = conn.loop.time()
            if end_stream:
                self.local_ended = True
            conn.flush_soon()
            if end_stream:
                self._finish()
            return
        view = memoryview(data)
        offset, total = 0, len(view)
        while offset < total or (end_stream and not self.local_ended):
            if self.closed:
                raise ClientGone("client stream closed")
            if conn.must_drain:
                await conn.drain()
            window = 0
            if offset < total:
                window = conn.window(self)  # min(stream, connection)
                if not conn.window_queue.may_send(self, window, conn.connection_window):
                    if conn.peer_eof and window <= 0:  # the client left: no window will open
                        self.reset(CANCEL)
                        raise ClientGone("client closed its connection with the window shut")
                    conn.flush_soon()  # a head held back for this data goes now, not after the wait
                    await self._wait_window()
                    continue
            step = min(window, total - offset, conn.max_frame_size)
            last = end_stream and offset + step >= total
            conn.send_data(self, view[offset : offset + step], last)
            offset += step
            self.last_activity = conn.loop.time()
            if last:
                self.local_ended = True
            conn.flush_soon()
            conn.window_queue.sent(conn.connection_window)
        if self.local_ended:
            self._finish()

    async def _wait_window(self) -> None:
        """Until a window opens; the connection's idle sweep bounds a stream that never moves."""
        waiter = self.window_waiter = self.conn.loop.create_future()
        try:
            await waiter
        finally:
            self.window_waiter = None

    def reset(self, code: int = CANCEL) -> None:
        if not self.closed:
            self.conn.reset_stream(self, code)
            self.conn.flush_soon()
        self._close()

    def _finish(self) -> None:
        """Our side ended: a client still uploading is told to stop (RFC 9113 8.1, NO_ERROR)."""
        if self.remote_ended:
            self._close()
        else:
            self.reset(NO_ERROR)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        pending = self.unacked + sum(flow for _, flow in self.chunks)
        self.chunks.clear()
        self.unacked = 0
        if pending:
            self.conn.acknowledge(self.id, pending)
        wake(self.waiter)
        wake(self.window_waiter)
        self.conn.window_queue.leave(self, self.conn.connection_window)
        self.conn.forget(self)

    def __repr__(self) -> str:
        return f"<InboundStream {self.id} closed={self.closed}>"
