"""One stream of the lean HTTP/2 connection: the response body the caller reads, and the upload.

Owns: a stream's record (its windows, content-length accounting and received chunks beside the
shared `h2_common.H2StreamBase` state), handing received chunks to the consumer while returning
receive credit only as it reads (backpressure), and the upload: which way a request body goes
(chunks, a `SocketBody`'s reads for TLS, or its spliced frames for cleartext), Expect: 100-continue,
and how an upload ends or fails. The connection (`connection.LeanH2Connection`) owns the windows,
the frames and the socket; this module only calls its public methods. Must never: buffer a
request body whole, pull the body iterator faster than the windows open, or turn a broken body
into a clean end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from functools import partial
from typing import TYPE_CHECKING

from sigv4proxy.errors import ProxyError, UpstreamError
from sigv4proxy.upstream.base import Interim, request_trailers
from sigv4proxy.upstream.body import SocketBody, SplicedFrames
from sigv4proxy.upstream.connection_core import feed_body
from sigv4proxy.upstream.h2_common import CANCEL, OPEN, H2StreamBase, StreamState

if TYPE_CHECKING:
    from sigv4proxy.upstream.lean_h2.connection import LeanH2Connection

STREAM_WINDOW = 1 << 20  # per-stream receive window: what one slow consumer may have buffered


class StreamGone(Exception):
    """Internal: the stream was reset or the connection closed while we were uploading."""


class LeanStream(H2StreamBase):
    """One request/response exchange; also the `ResponseBody` the Response reads from. The
    connection updates the windows and counts declared here as frames come and go."""

    __slots__ = ("head", "send_window", "recv_window", "credit", "expected", "received")

    def __init__(
        self,
        conn: LeanH2Connection,
        stream_id: int,
        send_window: int,
        head: bool,
        interim: Interim | None = None,
        state: StreamState = OPEN,
    ) -> None:
        super().__init__(conn, stream_id, interim, state)
        self.head = head  # a HEAD response declares a length it never sends
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.credit = 0  # consumed, stream credit not yet returned (batched)
        self.expected = -1  # content-length, -1 when absent
        self.received = 0

    def take(self) -> bytes | None:
        if self.unacked:  # the previous chunk was consumed: its credit may go back
            self.conn.consumed(self, self.unacked)
            self.unacked = 0
        if self.chunks:
            data = self.chunks.popleft()
            self.unacked = len(data)
            return data
        return self._nothing_here()

    def _buffered_credit(self) -> int:
        return sum(map(len, self.chunks))

    def _return_credit(self, size: int) -> None:
        self.conn.consumed(self, size)


# --- the upload ---
async def send_body(
    conn: LeanH2Connection, stream: LeanStream, body: bytes | AsyncIterable[bytes], expect_continue: bool = False
) -> None:
    try:
        if expect_continue and not await conn.hold_upload(stream):
            return  # answered on the head alone: the body is not sent (the stream is reset)
        ended = False
        send_chunk = partial(conn.send_data, stream)
        taken = _taken(conn, body)
        if taken is None:
            await feed_body(body, send_chunk)
        elif conn.splice_fd < 0:  # TLS: the body's reads
            await taken.send(send_chunk)
        else:
            ended = await _send_spliced(conn, stream, *taken)  # its last frame ended it
        if stream.state.closed or conn.is_closed():
            return
        if ended:
            conn.end_local(stream)
        else:
            conn.finish_request(stream, request_trailers(body))
    except StreamGone:
        pass  # the peer reset the stream (its RST_STREAM recorded why) or the connection died
    except ProxyError as err:
        if stream.state.remote_ended:  # the response is complete; only the upload stops
            conn.reset(stream, CANCEL)
        else:
            conn.fail_stream(stream, err)
    finally:
        conn.upload_done(stream)


def _taken(conn: LeanH2Connection, body: bytes | AsyncIterable[bytes]):
    """The body taken straight off the client's socket, if it is a `SocketBody`: into a cleartext
    connection (bytes already read, the rest as spliced frames or None); for TLS, which needs the
    bytes, its reads. None: send its chunks."""
    if not isinstance(body, SocketBody):
        return None
    return body.frames() if conn.splice_fd >= 0 else body.reads()


async def _send_spliced(
    conn: LeanH2Connection, stream: LeanStream, prefix: bytes, frames: SplicedFrames | None
) -> bool:
    """What aiohttp had already read, as usual; then the spliced rest, if any, its last frame
    ending the stream (True). `frames.end()` whatever happens: the client's connection is
    detached until then."""
    if frames is None:
        if prefix:
            await conn.send_data(stream, prefix)
        return False
    complete = upstream_gave_up = False
    try:
        if prefix:
            await conn.send_data(stream, prefix)
        await conn.send_spliced(stream, frames.source)
        complete = True
        return True
    except (StreamGone, UpstreamError, asyncio.CancelledError):
        upstream_gave_up = True  # the client may still be sending: its rest is read and dropped
        raise
    finally:
        frames.end(complete, upstream_gave_up)
