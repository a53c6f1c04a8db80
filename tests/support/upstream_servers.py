"""HTTP/1.1 and raw-socket test servers for the upstream client tests (loopback only).

Owns: an h11-based HTTP/1.1 server (an independent parser as the oracle) with echo, streamed,
chunked-with-trailers, close-delimited, close-mid-body and stall routes; a silent TCP server (to
hang TLS handshakes or the h2 preface); a trustme CA with server/client TLS contexts; a dead port.
Must never: bind anything but loopback, or outlive its test (use `async with`).

Routes: `/stream/<n>` Content-Length body of `pattern_bytes(n)`; `/chunked/<n>` chunked with
trailers; `/close-delimited/<n>` no length, ends at close; `/close-mid/<n>` half a body then close;
`/stall` never answers; `/close` echo with `Connection: close`; anything else: the JSON echo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from dataclasses import dataclass, field

import h11
import trustme

from support.h2_peers import echo_document, pattern_bytes
from support.loopback_server import LoopbackTestServer


@dataclass
class H1Stats:
    connections: int = 0
    requests: list[dict] = field(default_factory=list)
    response_bytes_written: int = 0  # counted after drain(): really handed to the kernel


class H1TestServer(LoopbackTestServer):
    """`async with H1TestServer() as server:` (pass `ssl_context` for https)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(ssl_context, host)
        self.stats = H1Stats()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection; also usable as `H2TestServer.http1_handler` (ALPN fallback)."""
        self.stats.connections += 1
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, digest, length = None, hashlib.sha256(), 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))  # b"" marks EOF for h11
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        digest.update(event.data)
                        length += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                keep_going = await self._respond(conn, writer, request, digest.hexdigest(), length)
                if not keep_going or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, OSError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, event) -> None:
        data = conn.send(event)
        if data:
            writer.write(data)
            await writer.drain()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                       request: h11.Request, body_sha256: str, body_length: int) -> bool:
        path = request.target
        tail = path.split(b"?", 1)[0].rsplit(b"/", 1)[-1]
        if path == b"/stall":
            await self._closing.wait()
            return False
        if path.startswith((b"/stream/", b"/close-mid/")):
            size = int(tail)
            await self._send(conn, writer, h11.Response(
                status_code=200, headers=[(b"Content-Length", str(size).encode())]))
            stop = size // 2 if path.startswith(b"/close-mid/") else size
            for offset in range(0, stop, 65536):
                piece = pattern_bytes(min(65536, stop - offset), offset)
                await self._send(conn, writer, h11.Data(data=piece))
                self.stats.response_bytes_written += len(piece)
            if stop < size:
                writer.transport.abort()
                return False
            await self._send(conn, writer, h11.EndOfMessage())
            return True
        if path.startswith(b"/chunked/"):
            size = int(tail)
            await self._send(conn, writer, h11.Response(
                status_code=200, headers=[(b"Transfer-Encoding", b"chunked")]))
            for offset in range(0, size, 10000):
                await self._send(conn, writer, h11.Data(data=pattern_bytes(min(10000, size - offset), offset)))
            await self._send(conn, writer, h11.EndOfMessage(
                headers=[(b"X-Checksum", b"abc123"), (b"X-Done", b"1")]))
            return True
        if path.startswith(b"/close-delimited/"):
            size = int(tail)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for offset in range(0, size, 65536):
                writer.write(pattern_bytes(min(65536, size - offset), offset))
                await writer.drain()
            writer.close()
            return False
        headers = [(n, v) for n, v in request.headers.raw_items()]
        document = echo_document(request.method, path, dict(request.headers).get(b"host"), None,
                                 headers, body_sha256, body_length)
        self.stats.requests.append(json.loads(document))
        response_headers = [(b"Content-Type", b"application/json"),
                            (b"Content-Length", str(len(document)).encode())]
        if path == b"/close":
            response_headers.append((b"Connection", b"close"))
        await self._send(conn, writer, h11.Response(status_code=200, headers=response_headers))
        if request.method != b"HEAD":
            await self._send(conn, writer, h11.Data(data=document))
        await self._send(conn, writer, h11.EndOfMessage())
        return True


class SilentServer:
    """Accepts TCP connections and never says a word (hangs TLS handshakes and the h2 preface)."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.wait_for(self._server.wait_closed(), 5)


def dead_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PKI:
    ca: trustme.CA
    ca_file: str
    server_cert: trustme.LeafCert

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        context.set_alpn_protocols(alpn)
        return context


def make_pki(tmp_path) -> PKI:
    ca = trustme.CA()
    cert = ca.issue_cert("upstream.test", "localhost", "127.0.0.1")
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    return PKI(ca, ca_file, cert)


class RawResponseServer:
    """Answers every request (after its head arrives) with fixed bytes, then closes if asked."""

    def __init__(self, response: bytes, close: bool = True) -> None:
        self.response = response
        self.close = close
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawResponseServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.response)
            await writer.drain()
            if self.close:
                writer.close()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            writer.close()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.wait_for(self._server.wait_closed(), 5)


class EarlyAnswerUpstream(asyncio.Protocol):
    """An HTTP/1.1 upstream (`loop.create_server(EarlyAnswerUpstream, ...)`) that answers 200
    "ok" to a request head at once and then stops reading: a request body is never taken."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.head = b""

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head = b""
            self.transport.pause_reading()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
