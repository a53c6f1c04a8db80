"""The request-body kinds the upstream layer takes, declared as types.

Owns: the kinds and what each lets a connection do. `bytes`: a body read whole (sent with the
head, replayable). `StreamedBody`: chunks as they arrive, trailers after them, and whether
anything was taken yet (a body not yet pulled can still be sent again). `IteratedBody`: any
async iterable as a StreamedBody. `SocketBody`: a streamed body whose rest can be taken straight
off the client's socket, moved in the kernel into a cleartext socket (`splice_into`), as HTTP/2
DATA frames put together in the kernel (`frames`, giving `SplicedFrames`), or read into the
process for TLS (`reads`, giving `SocketReads`). The inbound side builds them; connections call
only what the types declare. Must never: import anything above the upstream layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Protocol

from sigv4proxy.io.splice import FrameSource


class StreamedBody(ABC):
    """A body sent chunk by chunk as it arrives; iterate it once. No __slots__: a compiled
    subclass (setup.py) may not inherit any."""

    def __init__(self) -> None:
        self.pulled = False  # something was taken from it: it can no longer be sent again

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.pulled = True
        return self.chunks()

    @abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body's non-empty chunks, in order."""

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        """Trailer fields, read once the chunks have ended (gRPC-style); none by default."""
        return []


class IteratedBody(StreamedBody):
    """Any async iterable of chunks as a streamed body."""

    __slots__ = ("_source",)

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        super().__init__()
        self._source = source

    def chunks(self) -> AsyncIterator[bytes]:
        return self._source.__aiter__()


class SplicedFrames(Protocol):
    """The rest of a body as HTTP/2 DATA frames put together in the kernel."""

    source: FrameSource

    def end(self, complete: bool, upstream_gave_up: bool) -> None:
        """Once, whatever happened: the client's connection is given back or closed."""
        ...


class SocketReads(Protocol):
    """The rest of a body read straight off the client's socket, for an upstream that needs it."""

    async def send(self, send_chunk: Callable[[bytes], Awaitable[None]]) -> None: ...


class SocketBody(StreamedBody):
    """A streamed body whose rest may be taken off the client's socket instead of iterated. Each
    way, once; whatever it returns, the body counts as pulled."""

    __slots__ = ()

    async def splice_into(self, dst: int, timeout: float) -> bool:
        """Moves the rest into the cleartext socket `dst` in the kernel. False, with nothing
        taken: iterate the chunks instead."""
        self.pulled = True
        return await self._splice_into(dst, timeout)

    def frames(self) -> tuple[bytes, SplicedFrames | None] | None:
        """For a cleartext HTTP/2 upstream: (what was already read, to send as usual; the rest as
        spliced DATA frames, None if there is none). None: iterate the chunks instead."""
        self.pulled = True
        return self._frames()

    def reads(self) -> SocketReads | None:
        """For a TLS upstream, which needs the bytes. None: iterate the chunks instead."""
        self.pulled = True
        return self._reads()

    @abstractmethod
    async def _splice_into(self, dst: int, timeout: float) -> bool: ...

    @abstractmethod
    def _frames(self) -> tuple[bytes, SplicedFrames | None] | None: ...

    @abstractmethod
    def _reads(self) -> SocketReads | None: ...
