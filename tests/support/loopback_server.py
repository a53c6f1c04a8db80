"""The lifecycle the scripted test servers share: listen on an ephemeral loopback port, track
connection handler tasks and writers, and on exit abort the connections and wait (bounded) for
the handlers, cancelling only stragglers."""

from __future__ import annotations

import asyncio
import ssl


class LoopbackTestServer:
    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.ssl_context = ssl_context
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._closing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._accept, self.host, 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._closing.set()
        if self._handlers:  # aborted sockets end the handlers; cancel only a straggler
            await asyncio.wait(self._handlers, timeout=5)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.wait_for(self._server.wait_closed(), 5)
