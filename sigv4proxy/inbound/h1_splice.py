"""An HTTP/1.1 request body that a cleartext upstream socket may take straight off the client's.

Owns: `SpliceableBody`, the streamed body handed to the upstream when the inbound request has a
declared length on a cleartext socket: iterated like any body, or moved in the kernel by
`splice_into` (`sigv4proxy.splice`) with the inbound connection detached from aiohttp's parser
meanwhile. Must never: let the client's next request be read as body or the body as a request,
or keep a connection whose parser lost count of the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from sigv4proxy.splice import move_body


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
        taken = protocol.detach_body(content)
        if taken is None:
            return False
        prefix, detached = taken
        if not detached:  # aiohttp had read it all: no socket work beyond writing it
            await move_body(sock.fileno(), dst, prefix, 0, src_timeout=self._client_timeout,
                            dst_timeout=dst_timeout)
            return True
        complete = False
        try:
            await move_body(sock.fileno(), dst, prefix, self._length - content.total_bytes,
                            src_timeout=self._client_timeout, dst_timeout=dst_timeout)
            complete = True
        finally:
            protocol.reattach_body(content, complete)
        return True
