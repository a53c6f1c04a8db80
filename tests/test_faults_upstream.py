"""Upstream faults, through the proxy: client (raw HTTP/1.1 socket) → proxy → scripted upstream.

Each test scripts one misbehaving upstream (h2 server side, or plain asyncio) and asserts what the
client sees: a fast typed 5xx with a reason, a bounded timeout, a retried-and-successful request,
or, once the response head was sent, a visibly truncated body (never a hang, never a body that
looks complete). Also home of the helpers the other fault/hostile-input files import:
`ScriptedH2Upstream` (a per-request scriptable h2c peer that records what it saw) and
`raw_request`/`read_response` (a byte-exact HTTP/1.1 client that reports truncation).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
from hyperframe.frame import ContinuationFrame, HeadersFrame
from support.h2_peers import H2Script, H2TestServer, pattern_bytes, pattern_sha256
from support.proxy import LATTICE_HOST, running_proxy
from support.upstream_servers import H1TestServer, dead_port

HOST = LATTICE_HOST.encode()
IO_TIMEOUT = 10.0  # the bound on every client read: a hang fails the test instead of the suite


# --- a byte-exact HTTP/1.1 client -------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # the framing (Content-Length / last chunk) said the body ended
    eof: bool  # the proxy closed the connection

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


async def read_response(reader: asyncio.StreamReader, timeout: float = IO_TIMEOUT,
                        head_request: bool = False) -> RawResponse:
    """One response, framed by its headers; a cut connection gives complete=False, not an error."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
        resp = RawResponse(status, headers, b"", False, False)
        length = resp.header("content-length")
        chunked = (resp.header("transfer-encoding") or "").lower() == "chunked"
        if head_request or status in (204, 304) or 100 <= status < 200:
            resp.complete = True
        elif chunked:
            resp.body, resp.complete = await _read_chunked(reader)
        elif length is not None:
            data = await _read_upto(reader, int(length))
            resp.body, resp.complete = data, len(data) == int(length)
        else:  # close-delimited: can never be told apart from a cut
            resp.body = await reader.read()
            resp.eof = True
        if not resp.complete:
            resp.eof = reader.at_eof() or not await reader.read(1)
        return resp


async def _read_upto(reader: asyncio.StreamReader, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = await reader.read(min(65536, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    parts = []
    try:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts), True
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, ValueError):
        return b"".join(parts), False


async def raw_request(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_response(reader, timeout)
    finally:
        writer.close()


def get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), HOST, extra)


# --- a scriptable HTTP/2 upstream -------------------------------------------------------------
@dataclass
class Exchange:
    """One request the peer received; scripts answer through it."""

    peer: "ScriptedH2Upstream"
    conn: "_PeerConnection"
    stream_id: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def path(self) -> str:
        return self.headers.get(b":path", b"").decode()

    def respond(self, status: int = 200, body: bytes = b"", headers=(), end: bool = True) -> None:
        fields = [(b":status", str(status).encode()), *headers]
        self.conn.h2.send_headers(self.stream_id, fields, end_stream=end and not body)
        if body:
            self.conn.h2.send_data(self.stream_id, body, end_stream=end)
        self.conn.flush()

    async def send_body(self, total: int, chunk: int = 16384, pause: float = 0.0,
                        end: bool = True) -> int:
        """Sends up to `total` pattern bytes honouring flow control; stops early if reset."""
        sent = 0
        h2conn = self.conn.h2
        while sent < total:
            if self.stream_id in self.conn.reset_streams or self.conn.closed:
                return sent
            window = h2conn.local_flow_control_window(self.stream_id)
            if window <= 0:
                await self.conn.wait_window()
                continue
            step = min(window, chunk, total - sent, h2conn.max_outbound_frame_size)
            h2conn.send_data(self.stream_id, pattern_bytes(step, sent))
            sent += step
            self.conn.flush()
            await asyncio.sleep(pause)
        if end:
            h2conn.end_stream(self.stream_id)
            self.conn.flush()
        return sent

    def reset(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        self.conn.h2.reset_stream(self.stream_id, code)
        self.conn.flush()


Script = Callable[[Exchange], Awaitable[None]]


async def echo(ex: Exchange) -> None:
    doc = json.dumps({"path": ex.path, "conn": ex.conn.number,
                      "body_sha256": hashlib.sha256(ex.body).hexdigest(), "body_length": len(ex.body)})
    ex.respond(200, doc.encode(), [(b"content-type", b"application/json")])


@dataclass
class PeerLog:
    connections: int = 0
    requests: list[tuple[int, int, str]] = field(default_factory=list)  # (conn, stream, path)
    resets: list[tuple[int, int, int]] = field(default_factory=list)  # (conn, stream, code) received
    data_received: int = 0
    closed_by_client: int = 0


class _PeerConnection:
    def __init__(self, peer: "ScriptedH2Upstream", reader, writer, number: int) -> None:
        self.peer, self.reader, self.writer, self.number = peer, reader, writer, number
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False))
        self.pending: dict[int, tuple[dict[bytes, bytes], list[bytes]]] = {}
        self.reset_streams: set[int] = set()
        self.closed = False
        self.tasks: dict[int, asyncio.Task] = {}  # script task per stream
        self._window = asyncio.Event()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def wait_window(self) -> None:
        self._window.clear()
        async with asyncio.timeout(IO_TIMEOUT):
            await self._window.wait()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.flush()
        log = self.peer.log
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    log.closed_by_client += 1
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._handle(event)
                self.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._window.set()
            for task in list(self.tasks.values()):
                task.cancel()
            self.writer.close()

    def _handle(self, event) -> None:
        log = self.peer.log
        if isinstance(event, h2.events.RequestReceived):
            self.pending[event.stream_id] = (dict(event.headers), [])
            if event.stream_ended is not None:
                self._dispatch(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            log.data_received += len(event.data)
            if event.stream_id in self.pending:
                self.pending[event.stream_id][1].append(event.data)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if event.stream_ended is not None:
                self._dispatch(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.reset_streams.add(event.stream_id)
            log.resets.append((self.number, event.stream_id, int(event.error_code)))
            self._window.set()
            task = self.tasks.get(event.stream_id)
            if task is not None:
                task.cancel()  # the script's work for a cancelled stream stops with it
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()

    def _dispatch(self, stream_id: int) -> None:
        headers, parts = self.pending.pop(stream_id)
        ex = Exchange(self.peer, self, stream_id, headers, b"".join(parts))
        self.peer.log.requests.append((self.number, stream_id, ex.path))
        task = asyncio.get_running_loop().create_task(self._run_script(ex))
        self.tasks[stream_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(stream_id, None))

    async def _run_script(self, ex: Exchange) -> None:
        try:
            await self.peer.script(ex)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError):
            pass


class ScriptedH2Upstream:
    """`async with ScriptedH2Upstream(script) as peer:` an h2c (prior knowledge) server on
    127.0.0.1:0 whose `script(exchange)` answers each complete request; `peer.log` records
    connections, requests, RST_STREAMs received and client-closed connections."""

    def __init__(self, script: Script = echo) -> None:
        self.script = script
        self.log = PeerLog()
        self.port = 0
        self.connections: list[_PeerConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "ScriptedH2Upstream":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.log.connections += 1
        conn = _PeerConnection(self, reader, writer, self.log.connections)
        self.connections.append(conn)
        try:
            await conn.run()
        finally:
            self._tasks.discard(task)

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await asyncio.wait_for(self._server.wait_closed(), 5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def h2_upstream(port: int, **extra) -> dict:
    return dict(upstream=f"http://127.0.0.1:{port}", upstream_protocol="h2", **extra)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate(), "condition not reached in time"


async def error_count(proxy, kind: str) -> float:
    value = proxy.metrics.registry.get_sample_value("sigv4proxy_errors_total", {"kind": kind})
    return value or 0.0


# --- the tests --------------------------------------------------------------------------------
async def test_refused_connection_is_a_fast_502():
    async with running_proxy(**h2_upstream(dead_port(), connect_timeout=5)) as proxy:
        started = time.monotonic()
        resp = await raw_request(proxy.port, get())
        elapsed = time.monotonic() - started
        assert resp.status == 502 and resp.header("x-sigv4proxy-error") == "upstream_connect"
        assert resp.body.startswith(b"sigv4proxy: ") and resp.complete
        assert elapsed < 2.0  # refused is answered at once, not after connect_timeout
        assert await error_count(proxy, "upstream_connect") == 1


async def test_accepts_then_stalls_is_504_at_the_first_byte_timeout():
    async with H2TestServer(H2Script(stall=True)) as server:
        async with running_proxy(**h2_upstream(server.port, first_byte_timeout=0.6)) as proxy:
            started = time.monotonic()
            resp = await raw_request(proxy.port, get("/stalled"))
            elapsed = time.monotonic() - started
            assert resp.status == 504 and resp.header("x-sigv4proxy-error") == "upstream_timeout"
            assert 0.5 <= elapsed < 4.0
            assert await error_count(proxy, "upstream_timeout") == 1
            await wait_until(lambda: server.stats.active == 0)  # the stalled stream was cancelled


async def test_stream_reset_before_headers_is_502_and_the_connection_stays_usable():
    async def script(ex: Exchange) -> None:
        if ex.path == "/reset":
            ex.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        else:
            await echo(ex)

    async with ScriptedH2Upstream(script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            resp = await raw_request(proxy.port, get("/reset"))
            assert resp.status == 502 and resp.header("x-sigv4proxy-error") == "upstream_reset"
            assert b"INTERNAL_ERROR" in resp.body
            ok = await raw_request(proxy.port, get("/after"))
            assert ok.status == 200 and json.loads(ok.body)["conn"] == 1
            assert await error_count(proxy, "upstream_reset") == 1


async def test_stream_reset_mid_body_truncates_a_chunked_response():
    async def script(ex: Exchange) -> None:
        ex.respond(200, headers=[(b"content-type", b"application/octet-stream")], end=False)
        await ex.send_body(40000, end=False)
        await asyncio.sleep(0.05)
        ex.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    async with ScriptedH2Upstream(script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            resp = await raw_request(proxy.port, get("/cut"))
            assert resp.status == 200 and resp.header("transfer-encoding") == "chunked"
            assert not resp.complete and resp.eof  # no terminating chunk: never "complete"
            assert 0 < len(resp.body) <= 40000
            assert await error_count(proxy, "upstream_reset") == 1


async def test_upstream_closes_mid_response_truncates_content_length_body():
    size = 200_000
    async with H2TestServer(H2Script(close_mid_response=True)) as server:
        async with running_proxy(**h2_upstream(server.port)) as proxy:
            resp = await raw_request(proxy.port, get(f"/stream/{size}"))
            assert resp.status == 200 and resp.header("content-length") == str(size)
            assert not resp.complete and resp.eof and len(resp.body) < size
            assert resp.body == pattern_bytes(len(resp.body))  # what arrived is the real prefix


async def test_http1_upstream_closing_mid_body_truncates_too():
    size = 300_000
    async with H1TestServer() as server:
        async with running_proxy(upstream=f"http://127.0.0.1:{server.port}",
                                 upstream_protocol="http1") as proxy:
            resp = await raw_request(proxy.port, get(f"/close-mid/{size}"))
            assert resp.status == 200
            assert not resp.complete and resp.eof and len(resp.body) < size


async def test_goaway_in_flight_retries_unprocessed_streams_and_they_succeed():
    # The first connection serves 3 streams, sends GOAWAY(last=3rd) and ignores the rest: those
    # were never processed, so the pool retries them on a new connection.
    async with H2TestServer(H2Script(goaway_after=3)) as server:
        async with running_proxy(**h2_upstream(server.port)) as proxy:
            results = await asyncio.gather(*(raw_request(proxy.port, get(f"/delay/200?i={i}"))
                                             for i in range(8)))
            assert [r.status for r in results] == [200] * 8
            assert all(r.complete for r in results)
            assert server.stats.connections == 2
            paths = sorted(json.loads(r.body)["path"] for r in results)
            assert paths == sorted(f"/delay/200?i={i}" for i in range(8))


async def test_goaway_then_close_reports_processed_streams_and_retries_the_others():
    # GOAWAY(last_stream_id=1) with streams 1 and 3 open, then the connection drops: stream 1 was
    # (maybe) processed, so it is reported (502), never replayed; stream 3 is retried and succeeds.
    first_conn_streams: list[Exchange] = []

    async def script(ex: Exchange) -> None:
        if ex.conn.number > 1:
            await echo(ex)
            return
        first_conn_streams.append(ex)
        if len(first_conn_streams) == 2:
            lowest = min(e.stream_id for e in first_conn_streams)
            ex.conn.h2.close_connection(last_stream_id=lowest)
            ex.conn.flush()
            await asyncio.sleep(0.2)
            ex.conn.abort()

    async with ScriptedH2Upstream(script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            first = asyncio.ensure_future(raw_request(proxy.port, get("/one")))
            await wait_until(lambda: len(peer.log.requests) == 1)
            second = asyncio.ensure_future(raw_request(proxy.port, get("/two")))
            one, two = await asyncio.gather(first, second)
            assert one.status == 502 and one.header("x-sigv4proxy-error") == "upstream_reset"
            assert two.status == 200 and json.loads(two.body)["conn"] == 2
            assert [p for _, _, p in peer.log.requests].count("/one") == 1  # never replayed


async def test_malformed_frame_is_502_protocol_error():
    async def script(ex: Exchange) -> None:
        # A DATA frame on stream 0 (RFC 9113 §6.1: a connection error of type PROTOCOL_ERROR).
        ex.conn.writer.write(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"oops")

    async with ScriptedH2Upstream(script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            started = time.monotonic()
            resp = await raw_request(proxy.port, get())
            assert resp.status == 502 and resp.header("x-sigv4proxy-error") == "upstream_protocol"
            assert time.monotonic() - started < 3.0
            await wait_until(lambda: peer.log.closed_by_client == 1)  # the proxy hung up


async def test_response_headers_over_the_limit_are_502():
    async def script(ex: Exchange) -> None:
        # Framed by hand without Huffman coding: h2's pure-Python Huffman encoder takes >1 s here.
        block = hpack.Encoder().encode([(b":status", b"200"), (b"x-huge", b"v" * 100_000)],
                                       huffman=False)
        frames = [HeadersFrame(ex.stream_id, block[:16384], flags=["END_STREAM"])]
        for offset in range(16384, len(block), 16384):
            last = offset + 16384 >= len(block)
            frames.append(ContinuationFrame(ex.stream_id, block[offset:offset + 16384],
                                            flags=["END_HEADERS"] if last else []))
        ex.conn.writer.write(b"".join(f.serialize() for f in frames))

    async with ScriptedH2Upstream(script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            resp = await raw_request(proxy.port, get())
            assert resp.status == 502  # h2's decoder refuses a header list over 64 KiB
            assert resp.header("x-sigv4proxy-error") == "upstream_protocol"
            assert b"v" * 100 not in resp.body


async def test_invalid_response_header_value_never_reaches_the_client():
    async def script(ex: Exchange) -> None:
        ex.respond(200, b"x", [(b"x-split", b"a\r\nset-cookie: injected=1")])

    async with ScriptedH2Upstream(script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(get())
            raw = await asyncio.wait_for(reader.read(65536), IO_TIMEOUT)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 502")
            assert b"injected" not in raw


async def test_zero_flow_control_window_then_opened_upload_succeeds():
    body = pattern_bytes(300_000)
    async with H2TestServer(H2Script(initial_window_size=0, open_window_after=0.3)) as server:
        async with running_proxy(**h2_upstream(server.port)) as proxy:
            request = (b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                       % (HOST, len(body)) + body)
            resp = await raw_request(proxy.port, request)
            assert resp.status == 200 and resp.complete
            echo_doc = json.loads(resp.body)
            assert echo_doc["body_length"] == len(body)
            assert echo_doc["body_sha256"] == pattern_sha256(len(body))
