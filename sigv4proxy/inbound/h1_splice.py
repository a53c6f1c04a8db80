"""An HTTP/1.1 request body that a cleartext upstream socket may take straight off the client's.

Owns: `SpliceableBody`, the streamed body handed to the upstream when the inbound request has a
declared length on a cleartext socket: iterated like any body, or moved in the kernel by
`splice_into` (`sigv4proxy.splice`) with the inbound connection detached from aiohttp's parser
meanwhile; what the upstream stopped taking is read and dropped, as aiohttp does for a body
left unread. Must never: let the client's next request be read as body or the body as a request,
or keep a connection whose parser lost count of the body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from aiohttp import web

from sigv4proxy.errors import Overloaded, ProxyError, UpstreamError
from sigv4proxy.splice import Taken, discard_target, move_body


class SpliceableBody:
    """The chunks of a streamed request body (`async for`), or the whole rest of it moved to a
    socket in one call (`splice_into`). Either one, once."""

    __slots__ = ("_chunks", "_request", "_length", "_client_timeout")

    def __init__(self, chunks: AsyncIterator[bytes], request: web.BaseRequest, length: int,
                 client_timeout: float) -> None:
        self._chunks = chunks
        self._request = request
        self._length = length  # the declared Content-Length
        self._client_timeout = client_timeout  # --read-timeout: the longest client silence

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def splice_into(self, dst: int, dst_timeout: float) -> bool:
        """Sends the rest of the body to the cleartext socket `dst` (the caller has nothing
        unsent on it). False, with nothing taken, when the client's side cannot be detached:
        the caller then iterates the chunks instead."""
        request = self._request
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or transport.get_extra_info("sslcontext") is not None:
            return False
        protocol = request.protocol
        content = request.content
        got = protocol.detach_body(content)
        if got is None:
            return False
        prefix, detached = got
        if not detached:  # aiohttp had read it all: no socket work beyond writing it
            await move_body(sock.fileno(), dst, prefix, 0, src_timeout=self._client_timeout,
                            dst_timeout=dst_timeout)
            return True
        # Our own descriptor for the client's socket: its transport may close (and its number be
        # reused) while a move or a discard still runs.
        try:
            src = os.dup(sock.fileno())
        except OSError:
            protocol.reattach_body(content, False)
            raise Overloaded("out of file descriptors") from None
        count = self._length - content.total_bytes
        taken = Taken()
        complete = upstream_gave_up = False
        try:
            await move_body(src, dst, prefix, count, src_timeout=self._client_timeout,
                            dst_timeout=dst_timeout, taken=taken)
            complete = True
        except (UpstreamError, asyncio.CancelledError):
            upstream_gave_up = True  # answered, reset or stalled: the client may still be sending
            raise
        finally:
            if upstream_gave_up:
                _start(self._discard_rest(protocol, content, src, count - taken.count))
            else:
                os.close(src)
                protocol.reattach_body(content, complete)
        return True

    async def _discard_rest(self, protocol, content, src: int, left: int) -> None:
        """The rest of a body its upstream no longer takes, read and dropped as aiohttp does for
        a body left unread (for its lingering time at most, the client silent for --read-timeout
        at most), so that the client can finish sending and read the answer; the connection is
        kept if the body ends in that time. Closes `src`."""
        drained = False
        try:
            async with asyncio.timeout(protocol.lingering_time):
                await move_body(src, discard_target(), b"", left, src_timeout=self._client_timeout,
                                dst_timeout=self._client_timeout)
            drained = True
        except (ProxyError, TimeoutError):
            pass
        finally:
            os.close(src)
            protocol.reattach_body(content, drained)


_discarding: set[asyncio.Task] = set()  # referenced while they run


def _start(coro) -> None:
    task = asyncio.ensure_future(coro)
    _discarding.add(task)
    task.add_done_callback(_discarding.discard)
