"""An upstream whose every answer a test scripts step by step, over HTTP/1.1 or h2c (loopback only).

Owns: `ScriptedUpstream`, a server that hands each request to the test's `script(exchange)`
coroutine, and `Exchange`, the script's view of one request: the request head as it arrived, the
body read on demand (so a test sees whether the proxy sent it at all), and the answer written in
parts the script times itself — 1xx responses, the head, body chunks, trailers, a break — each
flushed at once. HTTP/1.1 is written as raw bytes (chunked unless the script declares a length);
h2c is the `h2` library's server side. The same script runs on both, so a test parametrizes the
upstream protocol. Must never: bind anything but loopback, or outlive its test (`async with`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

Fields = list[tuple[bytes, bytes]]
_TIMEOUT = 10.0  # every wait of a script is bounded


class Exchange:
    """One request as the scripted upstream saw it, and the script's means to answer it."""

    def __init__(self, protocol: str, connection: int, index: int, method: bytes, path: bytes,
                 authority: bytes, headers: Fields) -> None:
        self.protocol = protocol
        self.connection = connection  # which connection it came on (1, 2, ...)
        self.index = index  # which request on that connection (1, 2, ...)
        self.method = method
        self.path = path
        self.authority = authority  # Host or :authority
        self.headers = headers  # names lowercased; HTTP/2 pseudo-headers left out
        self.body = bytearray()  # what arrived of the request body so far
        self.trailers: Fields = []
        self.body_done = asyncio.Event()
        self.got_data = asyncio.Event()  # set at each arrival of body bytes
        self.upstream: ScriptedUpstream  # set when the upstream starts its script

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    async def read_body(self) -> bytes:
        """The whole request body (the upstream asks for it: over HTTP/1.1 that is also when
        an `Expect: 100-continue` would have been answered by a real server)."""
        await asyncio.wait_for(self.body_done.wait(), _TIMEOUT)
        return bytes(self.body)

    # --- the answer; each part leaves at once ---
    def informational(self, status: int, fields: Fields = ()) -> None: ...
    def head(self, status: int, fields: Fields = (), reason: bytes | None = None,
             length: int | None = None) -> None: ...
    def data(self, chunk: bytes) -> None: ...
    def end(self, trailers: Fields = ()) -> None: ...
    def cut(self) -> None:
        """Break the answer here (HTTP/1.1: close the socket; h2: RST_STREAM INTERNAL_ERROR)."""

    def drop_connection(self) -> None:
        """Close the whole connection at once, saying nothing (no GOAWAY, no answer)."""


Script = Callable[[Exchange], Awaitable[None]]


class _H1Exchange(Exchange):
    def __init__(self, writer: asyncio.StreamWriter, *args) -> None:
        super().__init__("http1", *args)
        self._writer = writer
        self._chunked = True

    def informational(self, status: int, fields: Fields = ()) -> None:
        self._writer.write(_h1_head(status, _phrase(status), fields))

    def head(self, status: int, fields: Fields = (), reason: bytes | None = None,
             length: int | None = None) -> None:
        fields = list(fields)
        self._chunked = length is None and self.method != b"HEAD" and status not in (204, 304)
        fields.append((b"Transfer-Encoding", b"chunked") if self._chunked
                      else (b"Content-Length", b"%d" % (length or 0)))
        self._writer.write(_h1_head(status, _phrase(status) if reason is None else reason, fields))

    def data(self, chunk: bytes) -> None:
        self._writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if self._chunked else chunk)

    def end(self, trailers: Fields = ()) -> None:
        if self._chunked:
            self._writer.write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")

    def cut(self) -> None:
        self._writer.close()

    def drop_connection(self) -> None:
        self.upstream.dropped.add(self.connection)
        self._writer.transport.abort()


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unregistered"


def _h1_head(status: int, reason: bytes, fields: Fields) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason), *(n + b": " + v for n, v in fields)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _H2Exchange(Exchange):
    def __init__(self, conn: _H2Connection, stream_id: int, *args) -> None:
        super().__init__("h2", *args)
        self._conn = conn
        self._id = stream_id

    def informational(self, status: int, fields: Fields = ()) -> None:
        self._conn.send(lambda h2c: h2c.send_headers(self._id, [(b":status", b"%d" % status), *fields]))

    def head(self, status: int, fields: Fields = (), reason: bytes | None = None,
             length: int | None = None) -> None:
        head = [(b":status", b"%d" % status), *((n.lower(), v) for n, v in fields)]
        if length is not None:
            head.append((b"content-length", b"%d" % length))
        self._conn.send(lambda h2c: h2c.send_headers(self._id, head))

    def data(self, chunk: bytes) -> None:
        self._conn.send(lambda h2c: h2c.send_data(self._id, chunk))

    def end(self, trailers: Fields = ()) -> None:
        if trailers:
            self._conn.send(lambda h2c: h2c.send_headers(
                self._id, [(n.lower(), v) for n, v in trailers], end_stream=True))
        else:
            self._conn.send(lambda h2c: h2c.end_stream(self._id))

    def cut(self) -> None:
        self._conn.send(lambda h2c: h2c.reset_stream(self._id, ErrorCodes.INTERNAL_ERROR))

    def drop_connection(self) -> None:
        self.upstream.dropped.add(self.connection)
        self._conn.writer.transport.abort()


class _H2Connection:
    def __init__(self, upstream: ScriptedUpstream, writer: asyncio.StreamWriter, number: int) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False))
        self.upstream = upstream
        self.writer = writer
        self.number = number
        self.exchanges: dict[int, _H2Exchange] = {}

    def send(self, action: Callable[[h2.connection.H2Connection], object]) -> None:
        try:
            action(self.h2)
        except h2.exceptions.ProtocolError:
            return  # the stream is gone (the proxy reset it): nothing left to answer
        self.writer.write(self.h2.data_to_send())

    def receive(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                fields = dict(event.headers)
                exchange = _H2Exchange(self, event.stream_id, self.number, len(self.exchanges) + 1,
                                       fields[b":method"], fields[b":path"], fields.get(b":authority", b""),
                                       [(n, v) for n, v in event.headers if not n.startswith(b":")])
                self.exchanges[event.stream_id] = exchange
                self.upstream.start(exchange)
            elif isinstance(event, h2.events.DataReceived):
                exchange = self.exchanges.get(event.stream_id)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if exchange is not None:
                    exchange.body += event.data
                    exchange.got_data.set()
            elif isinstance(event, h2.events.TrailersReceived):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.body_done.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.upstream.goaways.append(self.number)
        self.writer.write(self.h2.data_to_send())


class ScriptedUpstream:
    """`async with ScriptedUpstream("http1" | "h2", script) as upstream:`; `upstream.exchanges`
    lists every request it got."""

    def __init__(self, protocol: str, script: Script) -> None:
        assert protocol in ("http1", "h2")
        self.protocol = protocol
        self.script = script
        self.port = 0
        self.connections = 0  # accepted so far
        self.closed_by_client: list[int] = []  # connections the client (the proxy) closed
        self.goaways: list[int] = []  # h2 connections the client sent GOAWAY on
        self.dropped: set[int] = set()  # connections a script dropped
        self.exchanges: list[Exchange] = []
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.errors and exc_info[0] is None:
            raise self.errors[0]

    def start(self, exchange: Exchange) -> asyncio.Task[None]:
        exchange.upstream = self
        self.exchanges.append(exchange)
        task = asyncio.get_running_loop().create_task(self._run(exchange))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, exchange: Exchange) -> None:
        try:
            await asyncio.wait_for(self.script(exchange), _TIMEOUT)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported when the test leaves the `async with`
            self.errors.append(exc)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connections += 1
        number = self.connections
        try:
            if self.protocol == "h2":
                conn = _H2Connection(self, writer, number)
                conn.h2.initiate_connection()
                writer.write(conn.h2.data_to_send())
                while data := await reader.read(65536):
                    conn.receive(data)
                if number not in self.dropped:
                    self.closed_by_client.append(number)
            else:
                await self._serve_h1(reader, writer, number)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and number not in self.dropped:  # the client closed between requests
                self.closed_by_client.append(number)
        except (ConnectionError, OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    async def _serve_h1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        number: int) -> None:
        """Requests one after another; a body is read in the background as it arrives (chunked
        or by length), so the script decides only when it answers."""
        index = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head[:-4].split(b"\r\n")
            method, path, _ = request_line.split(b" ", 2)
            headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines)]
            index += 1
            host = next((v for n, v in headers if n == b"host"), b"")
            exchange = _H1Exchange(writer, number, index, method, path, host, headers)
            task = self.start(exchange)
            await self._read_h1_body(reader, exchange)
            await asyncio.wait_for(asyncio.shield(task), _TIMEOUT)  # the answer, then the next request

    @staticmethod
    async def _read_h1_body(reader: asyncio.StreamReader, exchange: Exchange) -> None:
        length = exchange.header(b"content-length")
        if length is not None:
            remaining = int(length)
            while remaining:
                data = await reader.read(min(remaining, 65536))
                if not data:
                    raise ConnectionError("request body cut short")
                exchange.body += data
                exchange.got_data.set()
                remaining -= len(data)
        elif (exchange.header(b"transfer-encoding") or b"").lower() == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if not size:
                    break
                exchange.body += (await reader.readexactly(size + 2))[:-2]
                exchange.got_data.set()
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line[:-2].partition(b":")
                exchange.trailers.append((name.strip().lower(), value.strip()))
        exchange.body_done.set()
