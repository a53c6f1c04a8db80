"""The HTTP/1.1 response the proxy writes itself (`inbound.h1_response`), read back by h11.

h11 is the independent oracle: it parses every response the proxy sends to a client that spoke
HTTP/1.1 or HTTP/1.0, with or without keep-alive, for GET and HEAD, against an upstream that
framed its answer by Content-Length or by chunks, and rejects any framing it cannot follow.
The upstream is a raw socket (`RawResponseServer`), so its exact bytes are the ones written here.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import parsedate_to_datetime

import h11
import pytest
from aiohttp import web
from support.proxy import LATTICE_HOST, running_proxy
from support.upstream_servers import H1TestServer, RawResponseServer

from sigv4proxy.errors import ProxyError
from sigv4proxy.inbound.h1 import AiohttpAnswer
from sigv4proxy.inbound.h1_response import ResponseWriter
from sigv4proxy.upstream.base import Response

HOST = LATTICE_HOST.encode()
IO_TIMEOUT = 10.0
MIB = 1 << 20
BODY = b"0123456789" * 300  # 3,000 bytes
LENGTH_FRAMED = b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
CHUNK_FRAMED = (b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (1000, BODY[i:i + 1000]) for i in range(0, 3000, 1000))
                + b"0\r\n\r\n")


class Exchange:
    """One client connection to the proxy; each response is parsed by h11 as a client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, method: bytes, version: bytes = b"1.1", extra: bytes = b"") -> tuple:
        """(h11 Response, body, closed after it): `method / HTTP/version` sent as raw bytes."""
        oracle = h11.Connection(h11.CLIENT)
        oracle.send(h11.Request(method=method, target="/", headers=[("Host", LATTICE_HOST)]))
        self.writer.write(b"%s / HTTP/%s\r\nHost: %s\r\n%s\r\n" % (method, version, HOST, extra))
        response, body = None, b""
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                event = oracle.next_event()
                if event is h11.NEED_DATA:
                    oracle.receive_data(await self.reader.read(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(f"unexpected {event!r}")
        return response, body, await self.closed()

    async def closed(self) -> bool:
        """The proxy closed the connection (rather than keeping it for another request)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), 0.3) == b""
        except TimeoutError:
            return False


async def connect(port: int) -> Exchange:
    return Exchange(*await asyncio.open_connection("127.0.0.1", port))


def header(response: h11.Response, name: bytes) -> list[bytes]:
    return [v for n, v in response.headers if n == name]


@pytest.mark.parametrize("upstream_bytes", [LENGTH_FRAMED, CHUNK_FRAMED], ids=["length", "chunked"])
@pytest.mark.parametrize("version, extra, keeps", [
    (b"1.1", b"", True),
    (b"1.1", b"Connection: close\r\n", False),
    (b"1.0", b"", False),
    (b"1.0", b"Connection: keep-alive\r\n", True),
], ids=["1.1", "1.1-close", "1.0", "1.0-keep-alive"])
async def test_framing_follows_the_client_version_and_what_the_upstream_declared(
        upstream_bytes, version, extra, keeps):
    async with RawResponseServer(upstream_bytes) as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
        client = await connect(proxy.port)
        try:
            for _ in range(2 if keeps else 1):  # a kept connection carries a second request
                response, body, closed = await client.send(b"GET", version, extra)
                assert response.status_code == 200 and body == BODY
                assert header(response, b"x-up") == [b"1"]
                length, chunked = header(response, b"content-length"), header(response, b"transfer-encoding")
                if upstream_bytes is LENGTH_FRAMED:
                    assert length == [b"3000"] and not chunked
                elif version == b"1.1":
                    assert chunked == [b"chunked"] and not length
                else:  # an HTTP/1.0 client has no chunks: the body ends with the connection
                    assert not length and not chunked
                keeps_now = keeps and (upstream_bytes is LENGTH_FRAMED or version == b"1.1")
                assert closed is not keeps_now
                connection = header(response, b"connection")
                if version == b"1.1":
                    assert connection == ([] if keeps_now else [b"close"])
                else:
                    assert connection == ([b"keep-alive"] if keeps_now else [])
                if not keeps_now:
                    break
        finally:
            client.writer.close()


@pytest.mark.parametrize("status, upstream_head, length", [
    (200, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", [b"5"]),  # answers HEAD
    (304, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", [b"5"]),
    (204, b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", []),  # RFC 9110 §8.6
    (204, b"HTTP/1.1 204 No Content\r\n\r\n", []),
], ids=["head", "304", "204-with-length", "204"])
async def test_bodiless_answers_carry_no_body_and_keep_the_connection(status, upstream_head, length):
    method = b"HEAD" if status == 200 else b"GET"
    async with RawResponseServer(upstream_head) as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
        client = await connect(proxy.port)
        try:
            for _ in range(2):
                response, body, closed = await client.send(method)
                assert response.status_code == status and body == b"" and not closed
                assert header(response, b"content-length") == length
                assert not header(response, b"transfer-encoding")
        finally:
            client.writer.close()


@pytest.mark.parametrize("upstream_date", [None, b"Mon, 23 Nov 2026 16:50:00 GMT"], ids=["missing", "sent"])
async def test_date_is_added_only_when_the_upstream_sent_none(upstream_date):
    date_line = b"Date: %s\r\n" % upstream_date if upstream_date else b""
    async with RawResponseServer(b"HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % date_line) as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
        client = await connect(proxy.port)
        try:
            response, body, _ = await client.send(b"GET")
        finally:
            client.writer.close()
    dates = header(response, b"date")
    assert len(dates) == 1 and body == b"ok"
    if upstream_date:
        assert dates == [upstream_date]
    else:
        assert abs(parsedate_to_datetime(dates[0].decode()).timestamp() - time.time()) < 5


async def test_an_upstream_body_that_breaks_before_its_first_byte_is_cut_after_the_head():
    """The head goes out as soon as it arrived, so a body the upstream breaks at once reaches the
    client as it would straight from the upstream: the head, then a close short of the declared
    length (never a clean end, never a 502 for a response that had begun)."""
    async with RawResponseServer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n") as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % LATTICE_HOST.encode())
                received = await asyncio.wait_for(reader.read(), 10)  # until the proxy closes
            finally:
                writer.close()
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nContent-Length: 10" in head
            assert body == b""


class _Body:
    """A finished upstream body (the `ResponseBody` protocol)."""

    trailers: list = []
    complete = ready = True

    def __init__(self, data: bytes) -> None:
        self.data = data

    def take(self) -> bytes:
        data, self.data = self.data, b""
        return data

    async def read(self) -> bytes:
        return self.take()

    def close(self) -> None:
        pass


async def test_a_header_with_cr_or_lf_is_refused_before_anything_is_written():
    """Every upstream parser refuses CR/LF in a value already; the writer checks again, as the
    last code before the client's socket: nothing is written and the caller can answer 502."""
    writer = ResponseWriter(time.time)
    outcomes = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse | AiohttpAnswer:
        bad = request.path == "/bad"
        value = b"a\r\nInjected: yes" if bad else b"fine"
        upstream = Response(200, [(b"x-v", value)], "HTTP/1.1", _Body(b"body"))
        answered = AiohttpAnswer(request, 200)
        try:
            await writer.relay(answered, upstream)
        except ProxyError as exc:
            outcomes.append((exc.kind, answered.started))
            return web.Response(status=exc.status, text="refused")
        return answered

    server = web.Server(handler)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        client = await connect(port)
        try:
            response, body, _ = await client.send(b"GET")
            assert response.status_code == 200 and header(response, b"x-v") == [b"fine"] and body == b"body"
        finally:
            client.writer.close()
        reader, raw = await asyncio.open_connection("127.0.0.1", port)
        raw.write(b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.readuntil(b"refused"), IO_TIMEOUT)
        raw.close()
    finally:
        listener.close()
        await server.shutdown(1)
    assert data.startswith(b"HTTP/1.1 502 ") and b"Injected" not in data
    assert outcomes == [("upstream_protocol", False)]


async def test_a_client_that_stops_reading_stops_the_upstream_too():
    """The writer waits whenever the client's transport is over its high-water mark: with a
    client that reads nothing, what the upstream manages to send is bounded by socket buffers,
    not by the body (128 MiB); once the client reads again, every byte arrives."""
    total, bound = 128 * MIB, 48 * MIB
    async with H1TestServer() as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"GET /stream/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (total, HOST))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            assert head.startswith(b"HTTP/1.1 200 ")
            written = -1
            for tick in range(40):  # up to 4 s, until the upstream has been held still for 0.5 s
                await asyncio.sleep(0.1)
                now = upstream.stats.response_bytes_written
                if now > bound or (now == written and tick > 5):
                    break
                written = now
            assert upstream.stats.response_bytes_written <= bound, upstream.stats.response_bytes_written
            received = 0
            async with asyncio.timeout(60):
                while received < total:
                    chunk = await reader.read(1 << 20)
                    assert chunk, f"cut after {received} bytes"
                    received += len(chunk)
            assert received == total
        finally:
            writer.close()


async def test_pipelined_requests_get_whole_responses_in_order():
    """Three requests in one write: each answer is complete and framed before the next starts
    (the writer goes straight to the transport, so order rests on one request at a time)."""
    async with RawResponseServer(CHUNK_FRAMED) as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        oracle = h11.Connection(h11.CLIENT)
        try:
            writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, HOST) for n in range(3)))
            bodies = []
            async with asyncio.timeout(IO_TIMEOUT):
                for n in range(3):
                    oracle.send(h11.Request(method="GET", target=f"/{n}", headers=[("Host", LATTICE_HOST)]))
                    oracle.send(h11.EndOfMessage())
                    body = b""
                    while True:
                        event = oracle.next_event()
                        if event is h11.NEED_DATA:
                            oracle.receive_data(await reader.read(65536))
                        elif isinstance(event, h11.Response):
                            assert event.status_code == 200
                        elif isinstance(event, h11.Data):
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                    bodies.append(body)
                    oracle.start_next_cycle()
            assert bodies == [BODY] * 3
        finally:
            writer.close()
