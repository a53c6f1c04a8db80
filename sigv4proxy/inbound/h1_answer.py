"""One HTTP/1.1 answer as the writer (`h1_response.ResponseWriter`) keeps it, and what it needs of
the client's connection.

Owns: `Answer`, the per-request state of an answer (status, keep-alive decision, started, body
bytes, the client's Expect: 100-continue and our 100) and what every HTTP/1.1 adapter answers the
same way (our own 100 Continue, an upstream 1xx, the relay, a cut). Each adapter (`h1` over
aiohttp, `h1_lean`) subclasses it with its connection's transport, version, method, keep-alive
wish and backpressure. Apart from the writer, and pure Python in the compiled build (setup.py):
the aiohttp adapter's subclass also inherits aiohttp's own class, which a compiled base refuses;
`h1_lean`'s compiled subclass inherits it as a Python class. Must never: write anything but our
own 100 itself (the writer writes the rest).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from sigv4proxy.errors import ProxyError

if TYPE_CHECKING:
    from sigv4proxy.exchange.exchange import Response

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Writer(Protocol):
    """What an answer asks of the writer (`h1_response.ResponseWriter`, which imports this module:
    the dependency runs one way)."""

    def interim(self, answered: Answer, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def relay(self, answered: Answer, upstream: Response) -> Awaitable[None]: ...


class Answer:
    """One HTTP/1.1 answer: the state the writer keeps, and what it needs of the client's
    connection (the transport, the request's version and method, whether the client's request
    lets the connection take another, the write backpressure), which each inbound adapter
    provides. Class-level defaults, no slots: a request sets only what changes (one object per
    request; the adapters' subclasses are the hot ones)."""

    status = 0
    keep_alive = False  # decided with the framing, before the head is written
    started = False  # a byte went out: from here on an error can only cut the connection
    body_bytes = 0  # body bytes relayed so far (for the access log)
    expects = False  # the client sent Expect: 100-continue and waits before its body
    continued = False  # a 100 (Continue) went to the client

    # --- the client's connection, as each adapter provides it ---
    transport: asyncio.Transport | None
    version: tuple[int, int]  # the request's HTTP version
    method: str
    client_keep_alive: bool  # the request allows another on this connection (version, Connection)

    @property
    def writing_paused(self) -> bool:
        """The transport is over its high-water mark: `drain` before writing more."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Returns once the transport is below its low-water mark (or the client is gone)."""
        raise NotImplementedError

    @property
    def writer(self) -> Writer:
        """The worker's writer (each adapter's server holds one)."""
        raise NotImplementedError

    # --- what every HTTP/1.1 adapter answers the same way (the exchange's Inbound) ---
    def send_continue(self) -> None:
        """Our own 100 (Continue), unless the upstream's was forwarded: the body is wanted now."""
        transport = self.transport
        if not self.continued and transport is not None:
            self.continued = True
            transport.write(_CONTINUE)

    def interim(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """An upstream 1xx response, forwarded (at most one 100)."""
        if status == 100:
            if self.continued:
                return
            self.continued = True
        self.writer.interim(self, status, headers)

    def relay(self, upstream: Response) -> Awaitable[None]:
        self.status = upstream.status
        return self.writer.relay(self, upstream)  # no coroutine of our own

    def cut(self, exc: ProxyError | None) -> None:
        """The head is out: the only honest signal left is a cut connection, after every byte the
        upstream did send (a close flushes them); a client gone gets an abort."""
        self.keep_alive = False
        transport = self.transport
        if transport is not None:
            if exc is not None:
                transport.close()
            else:
                transport.abort()
