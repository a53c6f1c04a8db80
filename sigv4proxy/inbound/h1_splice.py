"""An HTTP/1.1 request body that an upstream connection may take straight off the client's socket.

Owns: `SpliceableBody`, the streamed body handed to the upstream when the inbound request has a
declared length on a cleartext socket: iterated like any body, or taken off the socket
(`sigv4proxy.io.splice`) with the inbound connection detached from its parser meanwhile (a
`BodySocket`, which each HTTP/1.1 adapter provides):
moved in the kernel whole into a cleartext HTTP/1.1 socket (`splice_into`) or as HTTP/2 DATA
frames (`frames`), or read into the process for a TLS upstream (`reads`). What the upstream
stopped taking is read and dropped, as for a body left unread. Must never: let the
client's next request be read as body or the body as a request, or keep a connection whose
parser lost count of the body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from sigv4proxy.errors import Overloaded, ProxyError, UpstreamError
from sigv4proxy.exchange.exchange import SocketBody
from sigv4proxy.io.splice import FrameSource, ReadSource, Taken, cleartext_fd, discard_target, move_body


class BodySocket(Protocol):
    """The inbound connection a request body is taken off, as an HTTP/1.1 adapter provides it."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def lingering_time(self) -> float:
        """How long a body left unread is read and dropped before the connection closes."""
        ...

    def detach_body(self) -> tuple[bytes, bool, int] | None:
        """(what was already read of the current body; whether the socket is now ours until
        `reattach_body`, False when the body was already read whole; the body bytes read so far).
        None: not possible (the socket is closing, or the parser is not where it can stop)."""
        ...

    def reattach_body(self, complete: bool) -> None:
        """The detached body has ended: `complete`, the next request is read from the socket;
        otherwise the socket sits mid-body and the connection closes after this answer."""
        ...


class SpliceableBody(SocketBody):
    """The chunks of a streamed request body (`async for`), or the rest of it taken off the
    client's socket (`splice_into`, `frames`, `reads`). One of them, once."""

    __slots__ = ("_chunks", "_socket", "_length", "_client_timeout", "_before_take")

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        socket: BodySocket,
        length: int,
        client_timeout: float,
        before_take: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._chunks = chunks
        self._socket = socket
        self._length = length  # the declared Content-Length
        self._client_timeout = client_timeout  # --read-timeout: the longest client silence
        self._before_take = before_take  # e.g. the client's 100 (Continue): the body is wanted now

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    def _detach(self) -> tuple[bytes, int, int] | None:
        """(what the parser already read, our descriptor for the client's socket or -1 when the
        body was already read whole, the bytes still in it). None: it cannot be detached."""
        if self._before_take is not None:
            self._before_take()
            self._before_take = None
        socket = self._socket
        transport = socket.transport
        fd = cleartext_fd(transport) if transport is not None else -1
        if fd < 0:
            return None
        got = socket.detach_body()
        if got is None:
            return None
        prefix, detached, read = got
        if not detached:
            return prefix, -1, 0
        # Our own descriptor for the client's socket: its transport may close (and its number be
        # reused) while a move or a discard still runs.
        try:
            src = os.dup(fd)
        except OSError:
            socket.reattach_body(False)
            raise Overloaded("out of file descriptors") from None
        return prefix, src, self._length - read

    def _finish(self, src: int, left: int, complete: bool, upstream_gave_up: bool) -> None:
        """The move ended: the connection goes on (`complete`), or the rest of the body is read
        and dropped first (the upstream stopped taking it; the client may still be sending), or
        it closes after the answer (the client failed). Takes `src` over."""
        if upstream_gave_up:
            _start(self._discard_rest(src, left))
            return
        os.close(src)
        self._socket.reattach_body(complete)

    async def _splice_into(self, dst: int, dst_timeout: float) -> bool:
        """Sends the rest of the body to the cleartext socket `dst` (the caller has nothing
        unsent on it). False, with nothing taken, when the client's side cannot be detached:
        the caller then iterates the chunks instead."""
        detached = self._detach()
        if detached is None:
            return False
        prefix, src, count = detached
        if src < 0:  # the parser had read it all: no socket work beyond writing it
            await move_body(-1, dst, prefix, 0, src_timeout=self._client_timeout, dst_timeout=dst_timeout)
            return True
        taken = Taken()
        complete = upstream_gave_up = False
        try:
            await move_body(
                src, dst, prefix, count, src_timeout=self._client_timeout, dst_timeout=dst_timeout, taken=taken
            )
            complete = True
        except (UpstreamError, asyncio.CancelledError):
            upstream_gave_up = True  # answered, reset or stalled: the client may still be sending
            raise
        finally:
            self._finish(src, count - taken.count, complete, upstream_gave_up)
        return True

    def _frames(self) -> tuple[bytes, BodyFrames | None] | None:
        """For an HTTP/2 upstream: (what the parser already read, to send as usual; the rest as
        spliced DATA frames, None if there is no rest). None: iterate the chunks instead."""
        detached = self._detach()
        if detached is None:
            return None
        prefix, src, count = detached
        if src < 0:
            return prefix, None
        try:
            source = FrameSource(src, count, self._client_timeout)
        except OSError:
            self._finish(src, count, False, False)
            raise Overloaded("out of file descriptors") from None
        return prefix, BodyFrames(self, source)

    def _reads(self) -> BodyReads | None:
        """For a TLS upstream, which needs the bytes: the body read straight off the client's
        socket (see `BodyReads`). None: iterate the chunks instead."""
        detached = self._detach()
        if detached is None:
            return None
        prefix, src, count = detached
        return BodyReads(self, prefix, ReadSource(src, count, self._client_timeout) if src >= 0 else None)

    async def _discard_rest(self, src: int, left: int) -> None:
        """The rest of a body its upstream no longer takes, read and dropped as for a body left
        unread (for the lingering time at most, the client silent for --read-timeout at most), so
        that the client can finish sending and read the answer; the connection is kept if the
        body ends in that time. Closes `src`."""
        socket = self._socket
        drained = False
        try:
            async with asyncio.timeout(socket.lingering_time):
                await move_body(
                    src, discard_target(), b"", left, src_timeout=self._client_timeout, dst_timeout=self._client_timeout
                )
            drained = True
        except (ProxyError, TimeoutError):
            pass
        finally:
            os.close(src)
            socket.reattach_body(drained)


class BodyFrames:
    """The spliced rest of a body, for an HTTP/2 sender: `source` puts each DATA frame together
    in the kernel; `end()` once, whatever happened."""

    __slots__ = ("_body", "source")

    def __init__(self, body: SpliceableBody, source: FrameSource) -> None:
        self._body = body
        self.source = source

    def end(self, complete: bool, upstream_gave_up: bool) -> None:
        source = self.source
        left, src = source.left, source.release()
        self._body._finish(src, left, complete, upstream_gave_up)


class BodyReads:
    """A body for an upstream that needs its bytes: what the parser had already read, then the rest
    read off the client's socket (`source`, None when there is no rest). `send` once."""

    __slots__ = ("_body", "_prefix", "_source")

    def __init__(self, body: SpliceableBody, prefix: bytes, source: ReadSource | None) -> None:
        self._body = body
        self._prefix = prefix
        self._source = source

    async def send(self, send_chunk: Callable[[bytes], Awaitable[None]]) -> None:
        """Hands every part of the body to `send_chunk`, which returns once the upstream may take
        more. The client's connection is detached until this returns, whatever happens: a read
        failing is the client's failure (its connection closes after the answer); anything
        else, the upstream giving up or a cancellation, leaves the rest to be read and dropped."""
        source = self._source
        if source is None:
            if self._prefix:
                await send_chunk(self._prefix)
            return
        complete = client_failed = False
        try:
            data = self._prefix
            while True:
                if data:
                    await send_chunk(data)
                if not source.left:
                    break
                await asyncio.sleep(0)  # a fast client and upstream: let other requests run too
                try:
                    data = await source.read()
                except ProxyError:
                    client_failed = True
                    raise
            complete = True
        finally:
            left, src = source.left, source.release()
            self._body._finish(src, left, complete, not (complete or client_failed))


_discarding: set[asyncio.Task] = set()  # referenced while they run


def _start(coro) -> None:
    task = asyncio.ensure_future(coro)
    _discarding.add(task)
    task.add_done_callback(_discarding.discard)
