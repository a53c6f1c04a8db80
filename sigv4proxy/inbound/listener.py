"""One listener, two protocols: sniff the 24-byte HTTP/2 preface, then hand the connection over.

Owns: the protocol factory given to `loop.create_server` for the proxy port. A connection whose
first bytes are the HTTP/2 client preface (h2c with prior knowledge) goes to an h2 server
connection; anything else goes to the HTTP/1.1 server's protocol (`h1_lean`, or aiohttp's
`RequestHandler`; unchanged: after the hand-over the transport talks to it directly, so the
HTTP/1.1 path costs nothing extra per request). Also tracks the h2 connections for a graceful shutdown.
Must never: read past the first packet(s) needed to decide, or keep a connection nobody owns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the h2 server loads at the first h2c connection
    from sigv4proxy.inbound.h2server_core import H2ServerBase as H2ServerConnection

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Sniffer(asyncio.Protocol):
    """Holds a fresh connection until its first bytes say which protocol it speaks."""

    __slots__ = ("_listener", "_transport", "_buffer")

    def __init__(self, listener: InboundListener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._listener.undecided.add(self)
        if self._listener.head_timeout:
            # Silent or preface-dribbling connections are not kept forever.
            asyncio.get_running_loop().call_later(self._listener.head_timeout, self._deadline)

    def _deadline(self) -> None:
        if self in self._listener.undecided:
            self.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        n = min(len(buffer), len(H2_PREFACE))
        if buffer[:n] != H2_PREFACE[:n]:
            self._hand_over(self._listener.http1_factory(), buffer)
        elif n == len(H2_PREFACE):
            self._hand_over(self._listener.new_h2_connection(), buffer)
        else:
            self._buffer = buffer  # a prefix of the preface so far: wait for the rest

    def eof_received(self) -> bool | None:
        return None  # closes: nothing decided, nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.undecided.discard(self)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _hand_over(self, protocol: asyncio.Protocol | H2ServerConnection, first: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._listener.undecided.discard(self)
        self._buffer = b""
        # The h2c server is its transport's protocol by its methods, without asyncio.Protocol as
        # a base (compiled, that base would keep it from being a native class).
        transport.set_protocol(protocol)  # type: ignore[arg-type]
        protocol.connection_made(transport)
        if not transport.is_closing():
            protocol.data_received(first)


class InboundListener:
    """The protocol factory of the proxy port: `loop.create_server(listener, sock=...)`."""

    def __init__(
        self,
        http1_factory: Callable[[], asyncio.Protocol],
        h2_factory: Callable[[Callable[[H2ServerConnection], None]], H2ServerConnection],
        head_timeout: float | None = None,
    ) -> None:
        self.head_timeout = head_timeout  # seconds to decide the protocol; None: no limit
        self.http1_factory = http1_factory  # `LeanH1Server`, or aiohttp's `web.Server` instance
        self._h2_factory = h2_factory  # called with the on-close callback
        self.undecided: set[_Sniffer] = set()
        self.h2_connections: set[H2ServerConnection] = set()

    def __call__(self) -> asyncio.Protocol:
        return _Sniffer(self)

    def new_h2_connection(self) -> H2ServerConnection:
        conn = self._h2_factory(self.h2_connections.discard)
        self.h2_connections.add(conn)
        return conn

    def h2_streams(self) -> int:
        return sum(conn.active_streams for conn in self.h2_connections)

    def begin_shutdown(self) -> None:
        """GOAWAY on every h2 connection (open streams finish); undecided connections close."""
        for sniffer in list(self.undecided):
            sniffer.close()
        for conn in list(self.h2_connections):
            conn.shutdown()

    def close(self) -> None:
        for sniffer in list(self.undecided):
            sniffer.close()
        for conn in list(self.h2_connections):
            conn.close()
