"""Request bodies moved client socket to upstream socket inside the kernel (`sigv4proxy.splice`).

The mover on its own over real loopback TCP: exactly the asked bytes (what follows stays for the
next request), each failure typed, no descriptor kept. Through the proxy: a large upload to a
cleartext HTTP/1.1 upstream is spliced (the spy on os.splice counts the bytes) and the
simulator verifies its signature and the body's sha256; the client connection goes on parsing
requests after it, with the proxy's own header limits; bodies that must not or cannot be spliced
(TLS, h2c, chunked, `--no-splice`) stream as before; a client or an upstream that stops part-way
gets the usual typed answer and never a desynchronised connection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct

import pytest

from sigv4proxy import splice
from sigv4proxy.errors import BadRequest, RequestTimeout, UpstreamReset, UpstreamTimeout
from sigv4proxy.sim.server import SimConfig, start_simulator
from support.proxy import LATTICE_HOST, PRINCIPAL, SERVICE_ARN, running_proxy, write_identities

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux-only")

HOST = LATTICE_HOST.encode()


@pytest.fixture
def spliced(monkeypatch) -> list[int]:
    """Bytes each os.splice call moved (the real call underneath)."""
    moved: list[int] = []
    real = os.splice

    def counting(*args, **kwargs):
        n = real(*args, **kwargs)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counting)
    return moved


def _small_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # fixed, not autotuned
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)


async def _tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(outer, inner): a connected loopback TCP pair, both non-blocking."""
    listener = socket.socket()
    if small:
        _small_buffers(listener)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    outer = socket.socket()
    if small:
        _small_buffers(outer)
    outer.setblocking(False)
    loop = asyncio.get_running_loop()
    connecting = loop.sock_connect(outer, listener.getsockname())
    inner, _ = await asyncio.gather(loop.sock_accept(listener), connecting)
    listener.close()
    inner[0].setblocking(False)
    return outer, inner[0]


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        data = await loop.sock_recv(sock, min(1 << 20, n - len(out)))
        if not data:
            break
        out += data
    return bytes(out)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Route:
    """client -> [src] proxy [dst] -> upstream: two loopback TCP connections."""

    async def __aenter__(self):
        self.client, self.src = await _tcp_pair()
        self.dst, self.upstream = await _tcp_pair()
        return self

    async def __aexit__(self, *exc_info):
        for sock in (self.client, self.src, self.dst, self.upstream):
            sock.close()


async def test_moves_the_prefix_then_exactly_the_count_and_leaves_what_follows():
    body = os.urandom(3 * 1024 * 1024 + 5)
    loop = asyncio.get_running_loop()
    async with _Route() as r:
        sending = asyncio.ensure_future(loop.sock_sendall(r.client, body + b"NEXT REQUEST"))
        receiving = asyncio.ensure_future(_read_exactly(r.upstream, 3 + len(body)))
        await asyncio.wait_for(splice.move_body(r.src.fileno(), r.dst.fileno(), b"PRE", len(body),
                                                src_timeout=5, dst_timeout=5), 20)
        await asyncio.wait_for(sending, 5)
        assert await asyncio.wait_for(receiving, 5) == b"PRE" + body
        # the bytes after the body were not taken: they are the next request's
        assert await asyncio.wait_for(_read_exactly(r.src, 12), 5) == b"NEXT REQUEST"


async def test_a_client_that_closes_early_is_a_bad_request():
    loop = asyncio.get_running_loop()
    async with _Route() as r:
        await loop.sock_sendall(r.client, b"x" * 1000)
        r.client.shutdown(socket.SHUT_WR)
        with pytest.raises(BadRequest, match="shorter than its Content-Length"):
            await asyncio.wait_for(splice.move_body(r.src.fileno(), r.dst.fileno(), b"", 5000,
                                                    src_timeout=5, dst_timeout=5), 10)


async def test_a_silent_client_times_out():
    loop = asyncio.get_running_loop()
    async with _Route() as r:
        await loop.sock_sendall(r.client, b"x" * 1000)
        started = loop.time()
        with pytest.raises(RequestTimeout, match="stalled"):
            await asyncio.wait_for(splice.move_body(r.src.fileno(), r.dst.fileno(), b"", 5000,
                                                    src_timeout=0.3, dst_timeout=5), 10)
        assert 0.25 < loop.time() - started < 3
        assert await asyncio.wait_for(_read_exactly(r.upstream, 1000), 5) == b"x" * 1000


async def test_an_upstream_that_stops_reading_times_out():
    loop = asyncio.get_running_loop()
    client, src = await _tcp_pair(small=True)
    dst, upstream = await _tcp_pair(small=True)
    body = os.urandom(1 << 20) * 16  # far beyond every buffer on the way
    sending = asyncio.ensure_future(loop.sock_sendall(client, body))
    try:
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match="stopped reading"):
            await asyncio.wait_for(splice.move_body(src.fileno(), dst.fileno(), b"", len(body),
                                                    src_timeout=5, dst_timeout=0.3), 10)
        assert 0.25 < loop.time() - started < 3
    finally:
        sending.cancel()
        for sock in (client, src, dst, upstream):
            sock.close()


async def test_an_upstream_that_resets_is_an_upstream_reset():
    loop = asyncio.get_running_loop()
    async with _Route() as r:
        r.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.upstream.close()  # RST
        await asyncio.sleep(0.05)
        sending = asyncio.ensure_future(loop.sock_sendall(r.client, os.urandom(4 << 20)))
        with pytest.raises(UpstreamReset, match="upstream connection lost"):
            await asyncio.wait_for(splice.move_body(r.src.fileno(), r.dst.fileno(), b"", 4 << 20,
                                                    src_timeout=5, dst_timeout=5), 10)
        sending.cancel()


async def test_no_descriptor_outlives_a_move_and_a_failed_move_drops_its_pipe():
    loop = asyncio.get_running_loop()
    splice._free.clear()  # noqa: SLF001 - count from an empty free list
    async with _Route() as r:
        before = _open_fds()
        for _ in range(3):
            await loop.sock_sendall(r.client, b"y" * 70000)
            receiving = asyncio.ensure_future(_read_exactly(r.upstream, 70000))
            await splice.move_body(r.src.fileno(), r.dst.fileno(), b"", 70000, src_timeout=5, dst_timeout=5)
            assert await asyncio.wait_for(receiving, 5) == b"y" * 70000
        assert len(splice._free) == 1  # one pipe, reused: empty after each whole move
        assert _open_fds() == before + 2  # just that pipe's two ends
        # A failed move with bytes left in its pipe closes the pipe instead of keeping it.
        r.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.upstream.close()
        await asyncio.sleep(0.05)
        await loop.sock_sendall(r.client, b"z" * 60000)
        with pytest.raises(UpstreamReset):
            await splice.move_body(r.src.fileno(), r.dst.fileno(), b"", 60000, src_timeout=5, dst_timeout=5)
        assert len(splice._free) == 0
        assert _open_fds() == before - 1  # the upstream end closed above; nothing of the move's left


# --- through the proxy ---

@pytest.fixture
async def tls_sim(tmp_path, tls_material):
    cert, key, ca = tls_material
    server = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)),
                                             policy=None, service_arn=SERVICE_ARN, tls_cert=cert, tls_key=key))
    yield server, ca
    await server.aclose()


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    fields = {name.strip().lower(): value.strip() for name, value in (line.split(b":", 1) for line in lines)}
    return status, fields, await reader.readexactly(int(fields[b"content-length"]))


async def _post(port: int, body: bytes) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body)) + body)
    status, _, answer = await asyncio.wait_for(_response(reader), 20)
    writer.close()
    assert status == b"HTTP/1.1 200 OK", answer
    return json.loads(answer)


@pytest.mark.parametrize("setting, expect_spliced", [({}, True), ({"splice": False}, False)])
async def test_a_large_upload_to_a_cleartext_http1_upstream_is_spliced_signed_and_whole(
        sim, spliced, setting, expect_spliced):
    body = os.urandom(5 * 1024 * 1024 + 11)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1",
                             **setting) as proxy:
        seen = await _post(proxy.port, body)
    assert seen["principal"] == PRINCIPAL  # the simulator recomputed the signature
    assert seen["protocol"] == "HTTP/1.1"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    # Into the upstream socket (every other call fills a pipe): nearly all of it, or nothing.
    into_socket = sum(spliced) / 2
    if expect_spliced:
        assert len(body) - 256 * 1024 < into_socket <= len(body), (into_socket, len(body))
    else:
        assert into_socket == 0


async def test_bodies_that_cannot_be_spliced_stream_as_before(sim, tls_sim, spliced):
    """TLS and h2c upstreams need the bytes in the process; a chunked body has no length."""
    tls_server, ca = tls_sim
    body = os.urandom(2 * 1024 * 1024 + 1)
    async with running_proxy(upstream=f"https://127.0.0.1:{tls_server.port}", ca_bundle=ca,
                             upstream_protocol="http1") as proxy:
        seen = await _post(proxy.port, body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["protocol"] == "HTTP/1.1"
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy:
        seen = await _post(proxy.port, body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["protocol"] == "HTTP/2"
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (HOST, len(body), body))
        status, _, answer = await asyncio.wait_for(_response(reader), 20)
        writer.close()
        assert status == b"HTTP/1.1 200 OK"
        assert json.loads(answer)["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert sum(spliced) == 0


async def test_requests_after_a_spliced_body_are_parsed_with_the_proxys_limits(sim, spliced):
    """One write: a spliced body, a chunked body and a GET with a 12,000-byte header (over
    aiohttp's default field limit of 8,190, under ours); then a GET with a 17,000-byte one (over
    ours): the parser after the spliced body starts exactly where it ended and keeps the proxy's
    limits."""
    sized = os.urandom(3 * 1024 * 1024 + 3)
    chunked = os.urandom(100 * 1024)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /sized HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
                     b"POST /chunked HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     b"GET /long HTTP/1.1\r\nHost: %s\r\nX-Long: %s\r\n\r\n"
                     % (HOST, len(sized), sized, HOST, len(chunked), chunked, HOST, b"a" * 12000))
        answers = [await asyncio.wait_for(_response(reader), 20) for _ in range(3)]
        writer.write(b"GET /too-long HTTP/1.1\r\nHost: %s\r\nX-Long: %s\r\n\r\n" % (HOST, b"b" * 17000))
        status, fields, _ = await asyncio.wait_for(_response(reader), 20)
        writer.close()
    assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert status.split(b" ")[1] == b"431" and fields[b"x-sigv4proxy-error"] == b"headers_too_large"
    seen = [json.loads(text) for _, _, text in answers]
    assert [s["path"] for s in seen] == ["/sized", "/chunked", "/long"]
    assert all(s["principal"] == PRINCIPAL for s in seen)
    assert seen[0]["body_sha256"] == hashlib.sha256(sized).hexdigest()
    assert seen[1]["body_sha256"] == hashlib.sha256(chunked).hexdigest()
    assert sum(spliced) / 2 > 2 * 1024 * 1024  # the first body was spliced


async def test_a_body_that_arrived_whole_with_a_request_behind_it_keeps_that_request(sim):
    """Over 64 KiB (so not read whole up front) yet in aiohttp's first read, with the next request
    behind it: aiohttp paused mid-read holding that request unparsed, which must be parsed, not
    dropped with the parser, when the body is taken."""
    body = os.urandom(70 * 1024)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /whole HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
                     b"GET /behind HTTP/1.1\r\nHost: %s\r\n\r\n" % (HOST, len(body), body, HOST))
        answers = [await asyncio.wait_for(_response(reader), 10) for _ in range(2)]
        writer.close()
    seen = [json.loads(text) for _, _, text in answers]
    assert [s["path"] for s in seen] == ["/whole", "/behind"]
    assert seen[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_a_client_that_stops_mid_body_gets_408_and_its_connection_closes(sim, spliced):
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1",
                             read_timeout=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, 4 << 20))
        writer.write(os.urandom(1 << 20))  # a quarter, then silence
        status, fields, text = await asyncio.wait_for(_response(reader), 10)
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert fields[b"x-sigv4proxy-error"] == b"request_timeout" and b"stalled" in text
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: the rest may still come
        writer.close()
        assert sum(spliced) > 0
        # The upstream connection that got a cut body is not reused: the next upload verifies.
        body = os.urandom(1 << 20)
        seen = await _post(proxy.port, body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


class _EarlyAnswerUpstream(asyncio.Protocol):
    """Answers 200 to a request head at once and never reads its body."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.head = b""

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head = b""
            self.transport.pause_reading()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def _early_answer_upstream() -> tuple[asyncio.AbstractServer, int]:
    listener = socket.socket()
    _small_buffers(listener)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(_EarlyAnswerUpstream, sock=listener)
    return server, listener.getsockname()[1]


async def test_an_upload_the_upstream_answers_unread_is_relayed_and_the_connection_kept():
    """The upstream answers at once and never reads the spliced body: the answer is relayed, the
    rest of the body is read and dropped (as aiohttp does for a body left unread), so the client
    finishes sending, and its next request on the same connection is served."""
    server, up_port = await _early_answer_upstream()
    body = os.urandom(1 << 20) * 32  # far beyond every buffer on the way
    try:
        async with running_proxy(upstream=f"http://127.0.0.1:{up_port}", upstream_protocol="http1") as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body)))
            writer.write(body)
            sending = asyncio.ensure_future(writer.drain())
            status, _, text = await asyncio.wait_for(_response(reader), 10)
            assert (status, text) == (b"HTTP/1.1 200 OK", b"ok")
            await asyncio.wait_for(sending, 10)  # all of it taken
            writer.write(b"GET /next HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST)
            assert (await asyncio.wait_for(_response(reader), 5))[2] == b"ok"
            writer.close()
    finally:
        server.close()


async def test_a_client_silent_after_an_early_answer_has_its_connection_closed():
    """As above, but the client stops sending part-way: once it has been silent for
    --read-timeout the connection closes (its socket sits mid-body; nothing waits for ever)."""
    server, up_port = await _early_answer_upstream()
    try:
        async with running_proxy(upstream=f"http://127.0.0.1:{up_port}", upstream_protocol="http1",
                                 read_timeout=0.5) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, 8 << 20))
            writer.write(os.urandom(1 << 20))
            status, _, text = await asyncio.wait_for(_response(reader), 10)
            assert (status, text) == (b"HTTP/1.1 200 OK", b"ok")
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert asyncio.get_running_loop().time() - started > 0.3
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # others served
            writer.write(b"GET /next HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST)
            assert (await asyncio.wait_for(_response(reader), 5))[2] == b"ok"
            writer.close()
    finally:
        server.close()
