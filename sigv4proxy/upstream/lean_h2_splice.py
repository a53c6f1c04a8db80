"""A request body spliced into a cleartext HTTP/2 connection as DATA frames, never through the process.

Owns: sending the spliced rest of a body (`inbound.h1_splice.BodyFrames`) on a lean HTTP/2
stream: each frame sized to the windows and to what the client has sent, put together in a pipe
(`splice.FrameSource`) and written between the connection's other writes: only once its own
writes are all handed to the kernel, and with them held back (`_gated`) while a frame is part
written. Must never: interleave a frame with another write, leave a frame half written unless
the connection dies with it, or send past either flow-control window.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sigv4proxy.errors import ProxyError, UpstreamReset, UpstreamTimeout
from sigv4proxy.io.splice import wait_writable
from sigv4proxy.wire import h2_wire as w

if TYPE_CHECKING:
    from sigv4proxy.io.splice import FrameSource
    from sigv4proxy.upstream.lean_h2 import LeanH2Connection
    from sigv4proxy.upstream.lean_h2_stream import LeanStream


async def send_frames(conn: LeanH2Connection, stream: LeanStream, source: FrameSource,
                      window: Callable[[], Awaitable[int]], gone: type[Exception]) -> None:
    """All of `source` as DATA frames on `stream`, the last one ending the stream (a spliced body
    has no trailers; one frame and one segment fewer than an empty END_STREAM frame after it).
    `window()` waits until the stream may send and returns how much (the plain sender's own
    wait); `gone` is raised when the connection closed."""
    timeout = conn.timeouts.read
    while source.left:
        available = await source.wait_data()
        size = min(await window(), conn._peer_max_frame, available, source.max_payload)
        # Taken from the windows now: other streams send while this frame is put together.
        stream.send_window -= size
        conn._send_window -= size
        conn._window_queue.sent(conn._send_window)
        flags = w.FLAG_END_STREAM if size == source.left else 0
        await source.assemble(w.frame_header(w.DATA, flags, stream.id, size), size)
        await _wire_free(conn, timeout, gone)
        if not source.emit(conn._splice_fd):  # the socket took part of it: finish it alone
            conn._gated = True
            finisher = conn.frame_finisher = source.finisher = asyncio.ensure_future(
                _finish_frame(conn, source, timeout))
            await asyncio.shield(finisher)  # cancelled: the frame is still finished, then dropped


async def _wire_free(conn: LeanH2Connection, timeout: float, gone: type[Exception]) -> None:
    """Returns when nothing of the connection's is waiting to be written: no frame being
    finished, our queued frames handed to the transport, the transport's buffer empty."""
    while True:
        if conn.is_closed():
            raise gone
        finisher = conn.frame_finisher
        if finisher is not None and not finisher.done():
            done, _ = await asyncio.wait((finisher,), timeout=timeout)
            if not done:
                raise UpstreamTimeout("upstream stopped reading")
            continue
        if conn._out:
            conn._flush()
        transport = conn._transport
        if transport is None or not transport.get_write_buffer_size():
            return
        if not await _writable(conn, timeout):
            raise UpstreamTimeout("upstream stopped reading")


async def _finish_frame(conn: LeanH2Connection, source: FrameSource, timeout: float) -> None:
    """Writes the rest of a part-written frame; nothing else may be written meanwhile. Not
    cancelled with the stream (shielded): a frame cut short would corrupt the connection, so a
    failure here ends the connection."""
    try:
        while not source.emit(conn._splice_fd):
            if conn.is_closed():
                raise UpstreamReset("upstream connection closed")
            if not await _writable(conn, timeout):
                raise UpstreamTimeout("upstream stopped reading")
    except ProxyError as err:
        conn._gated = False
        conn._out.clear()
        if conn._transport is not None:
            conn._transport.abort()
        conn._lost(err)
        raise
    conn._gated = False
    conn._flush()


async def _writable(conn: LeanH2Connection, timeout: float) -> bool:
    fd = os.dup(conn._splice_fd)  # the event loop watches only descriptors no transport owns
    try:
        return await wait_writable(fd, timeout)
    finally:
        os.close(fd)
