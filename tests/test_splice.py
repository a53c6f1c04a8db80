"""Request bodies moved client socket to upstream socket inside the kernel (`sigv4proxy.io.splice`).

The mover on its own over real loopback TCP: exactly the asked bytes (what follows stays for the
next request), each failure typed, no descriptor kept; so is the reader that takes a body into
the process for a TLS upstream (`ReadSource`: TLS needs the bytes, not aiohttp's parser).
Through the proxy: a large upload to a cleartext HTTP/1.1 upstream is spliced (the spy on
os.splice counts the bytes) and the simulator verifies its signature and the body's sha256; the
client connection goes on parsing requests after it, with the proxy's own header limits; bodies
that must not or cannot be spliced (TLS, the `h2` library, chunked, `--no-splice`) are not; a
client or an upstream that stops part-way gets the usual typed answer and never a
desynchronised connection, also when the body is read off the socket for a TLS upstream instead
(HTTP/1.1 and HTTP/2 by ALPN). Into a cleartext HTTP/2 upstream the body goes as DATA frames put
together in the kernel, interleaved with other streams' frames, also when frames are written in
pieces."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import struct

import pytest

from sigv4proxy.io import splice
from sigv4proxy.errors import BadRequest, RequestTimeout, UpstreamReset, UpstreamTimeout
from support.polling import eventually
from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy
from support.h2_peers import H2Script, H2TestServer
from support.raw_http import read_response, small_buffers, tcp_pair
from support.upstream_servers import EarlyAnswerUpstream, make_pki

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


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Bytes each `splice.ReadSource.read` returned (the real read underneath): a body read off
    the client's socket for a TLS upstream."""
    got: list[int] = []
    real = splice.ReadSource.read

    async def counting(self):
        data = await real(self)
        got.append(len(data))
        return data

    monkeypatch.setattr(splice.ReadSource, "read", counting)
    return got


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
        self.client, self.src = await tcp_pair()
        self.dst, self.upstream = await tcp_pair()
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
    client, src = await tcp_pair(small=True)
    dst, upstream = await tcp_pair(small=True)
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


# --- the TLS reader on its own ---

@pytest.fixture
async def connected():
    """(client, inner): a loopback TCP pair, both closed after the test."""
    client, inner = await tcp_pair()
    yield client, inner
    client.close()
    inner.close()


async def test_reads_for_tls_take_exactly_the_body_and_leave_what_follows(connected):
    client, inner = connected
    body = os.urandom(3 * splice.READ_SIZE + 5)
    sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(client, body + b"NEXT"))
    source = splice.ReadSource(os.dup(inner.fileno()), len(body), 5.0)
    got = []
    while source.left:
        got.append(await asyncio.wait_for(source.read(), 5))
    await sending
    assert b"".join(got) == body
    assert max(map(len, got)) <= splice.READ_SIZE
    os.close(source.release())
    assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(inner, 100), 5) == b"NEXT"


async def test_a_read_of_a_client_that_closes_early_is_a_bad_request(connected):
    client, inner = connected
    client.sendall(b"x" * 1000)
    client.close()
    source = splice.ReadSource(os.dup(inner.fileno()), 5000, 5.0)
    assert await source.read() == b"x" * 1000
    with pytest.raises(BadRequest):
        await asyncio.wait_for(source.read(), 5)
    os.close(source.release())


async def test_a_read_of_a_silent_client_times_out(connected):
    _, inner = connected
    source = splice.ReadSource(os.dup(inner.fileno()), 5000, 0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(RequestTimeout):
        await asyncio.wait_for(source.read(), 5)
    assert asyncio.get_running_loop().time() - started >= 0.2
    os.close(source.release())


# --- through the proxy ---

async def _post(port: int, body: bytes) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body)) + body)
    status, _, answer = await asyncio.wait_for(read_response(reader), 20)
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


async def test_bodies_that_cannot_be_spliced_are_not(sim, tls_sim, spliced):
    """TLS needs the bytes in the process (they are read off the socket instead), and so does
    the `h2` library client; a chunked body has no length."""
    tls_server, ca = tls_sim
    body = os.urandom(2 * 1024 * 1024 + 1)
    async with running_proxy(upstream=f"https://127.0.0.1:{tls_server.port}", ca_bundle=ca,
                             upstream_protocol="http1") as proxy:
        seen = await _post(proxy.port, body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["protocol"] == "HTTP/1.1"
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                             h2_implementation="h2") as proxy:
        seen = await _post(proxy.port, body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["protocol"] == "HTTP/2"
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (HOST, len(body), body))
        status, _, answer = await asyncio.wait_for(read_response(reader), 20)
        writer.close()
        assert status == b"HTTP/1.1 200 OK"
        assert json.loads(answer)["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert sum(spliced) == 0


def _simulator(tls: bool, sim, tls_sim) -> tuple[str, str]:
    """(upstream URL, CA file): the simulator behind TLS, or in cleartext (the CA then unused)."""
    tls_server, ca = tls_sim
    return (f"https://127.0.0.1:{tls_server.port}" if tls else f"http://127.0.0.1:{sim.port}"), ca


TAKEN_WAYS = pytest.mark.parametrize("tls, protocol", [(False, "http1"), (True, "http1"), (True, "h2")],
                                     ids=["spliced", "read-for-tls-http1", "read-for-tls-h2"])


@TAKEN_WAYS
async def test_requests_after_a_body_taken_off_the_socket_are_parsed_with_the_proxys_limits(
        sim, tls_sim, spliced, reads, tls, protocol):
    """One write: a body taken off the socket (spliced, or read for TLS), a chunked body and a
    GET with a 12,000-byte header (over aiohttp's default field limit of 8,190, under ours); then
    a GET with a 17,000-byte one (over ours): the parser after the taken body starts exactly
    where it ended and keeps the proxy's limits. The simulator recomputes every signature."""
    sized = os.urandom(3 * 1024 * 1024 + 3)
    chunked = os.urandom(100 * 1024)
    upstream, ca = _simulator(tls, sim, tls_sim)
    fds_before, pipes_before = _open_fds(), len(splice._free)
    async with running_proxy(upstream=upstream, ca_bundle=ca, upstream_protocol=protocol) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /sized HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
                     b"POST /chunked HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     b"GET /long HTTP/1.1\r\nHost: %s\r\nX-Long: %s\r\n\r\n"
                     % (HOST, len(sized), sized, HOST, len(chunked), chunked, HOST, b"a" * 12000))
        answers = [await asyncio.wait_for(read_response(reader), 20) for _ in range(3)]
        writer.write(b"GET /too-long HTTP/1.1\r\nHost: %s\r\nX-Long: %s\r\n\r\n" % (HOST, b"b" * 17000))
        status, fields, _ = await asyncio.wait_for(read_response(reader), 20)
        writer.close()
    assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert status.split(b" ")[1] == b"431" and fields[b"x-sigv4proxy-error"] == b"headers_too_large"
    seen = [json.loads(text) for _, _, text in answers]
    assert [s["path"] for s in seen] == ["/sized", "/chunked", "/long"]
    assert all(s["principal"] == PRINCIPAL for s in seen)
    assert seen[0]["body_sha256"] == hashlib.sha256(sized).hexdigest()
    assert seen[1]["body_sha256"] == hashlib.sha256(chunked).hexdigest()
    assert seen[0]["protocol"] == ("HTTP/2" if protocol == "h2" else "HTTP/1.1")
    if tls:  # read beyond what aiohttp had read, in parts of at most READ_SIZE; nothing spliced
        assert len(sized) - 256 * 1024 < sum(reads) <= len(sized) and max(reads) <= splice.READ_SIZE
        assert not spliced
    else:
        assert sum(spliced) / 2 > 2 * 1024 * 1024 and not reads  # the first body was spliced
    # The proxy has stopped: no descriptor of the taken body is left (idle pipes kept for reuse
    # aside; the simulator closes its ends of the proxy's connections as it notices).
    assert await eventually(lambda: _open_fds() - 2 * (len(splice._free) - pipes_before) <= fds_before)


async def test_a_body_that_arrived_whole_with_a_request_behind_it_keeps_that_request(sim):
    """Over 64 KiB (so not read whole up front) yet in aiohttp's first read, with the next request
    behind it: aiohttp paused mid-read holding that request unparsed, which must be parsed, not
    dropped with the parser, when the body is taken."""
    body = os.urandom(70 * 1024)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /whole HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
                     b"GET /behind HTTP/1.1\r\nHost: %s\r\n\r\n" % (HOST, len(body), body, HOST))
        answers = [await asyncio.wait_for(read_response(reader), 10) for _ in range(2)]
        writer.close()
    seen = [json.loads(text) for _, _, text in answers]
    assert [s["path"] for s in seen] == ["/whole", "/behind"]
    assert seen[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


@TAKEN_WAYS
async def test_a_client_that_stops_mid_body_gets_408_and_its_connection_closes(
        sim, tls_sim, spliced, reads, tls, protocol):
    upstream, ca = _simulator(tls, sim, tls_sim)
    taken = reads if tls else spliced
    async with running_proxy(upstream=upstream, ca_bundle=ca, upstream_protocol=protocol, read_timeout=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, 4 << 20))
        writer.write(os.urandom(1 << 20))  # a quarter, then silence
        status, fields, text = await asyncio.wait_for(read_response(reader), 10)
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert fields[b"x-sigv4proxy-error"] == b"request_timeout" and b"stalled" in text
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: the rest may still come
        writer.close()
        assert sum(taken) > 0
        # The upstream connection that got a cut body is not reused: the next upload verifies.
        body = os.urandom(1 << 20)
        seen = await _post(proxy.port, body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


async def _early_answer_upstream(context: ssl.SSLContext | None = None) -> tuple[asyncio.AbstractServer, int]:
    listener = socket.socket()
    small_buffers(listener)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(EarlyAnswerUpstream, sock=listener, ssl=context)
    return server, listener.getsockname()[1]


@pytest.mark.parametrize("tls", [False, True], ids=["spliced", "read-for-tls"])
async def test_an_upload_the_upstream_answers_unread_is_relayed_and_the_connection_kept(tls, tmp_path):
    """The upstream answers at once and never reads the body taken off the client's socket
    (spliced, or read for TLS): the answer is relayed, the rest of the body is read and dropped
    (as aiohttp does for a body left unread), so the client finishes sending, and its next
    request on the same connection is served."""
    pki = make_pki(tmp_path)
    server, up_port = await _early_answer_upstream(pki.server_context(["http/1.1"]) if tls else None)
    body = os.urandom(1 << 20) * 32  # far beyond every buffer on the way
    try:
        async with running_proxy(upstream=f"{'https' if tls else 'http'}://127.0.0.1:{up_port}", ca_bundle=pki.ca_file,
                                 upstream_protocol="http1") as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body)))
            writer.write(body)
            sending = asyncio.ensure_future(writer.drain())
            status, _, text = await asyncio.wait_for(read_response(reader), 10)
            assert (status, text) == (b"HTTP/1.1 200 OK", b"ok")
            await asyncio.wait_for(sending, 10)  # all of it taken
            writer.write(b"GET /next HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST)
            assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"ok"
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
            status, _, text = await asyncio.wait_for(read_response(reader), 10)
            assert (status, text) == (b"HTTP/1.1 200 OK", b"ok")
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert asyncio.get_running_loop().time() - started > 0.3
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # others served
            writer.write(b"GET /next HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST)
            assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"ok"
            writer.close()
    finally:
        server.close()


# --- into a cleartext HTTP/2 upstream, as DATA frames ---

@pytest.fixture
def small_splices(monkeypatch) -> list[int]:
    """Every os.splice moves at most 3,000 bytes: each DATA frame is put together and written in
    pieces, so frames are part-written (and finished alone) all the time."""
    moved: list[int] = []
    real = os.splice

    def capped(src, dst, count, *args, **kwargs):
        n = real(src, dst, min(count, 3000), *args, **kwargs)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", capped)
    return moved


async def _post_and_get_on(port: int, body: bytes, gets: int) -> list[dict]:
    """One connection: a POST of `body`, then `gets` GETs; the simulator's echo of each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body)) + body)
    for i in range(gets):
        writer.write(b"GET /get%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, HOST))
    answers = [await asyncio.wait_for(read_response(reader), 30) for _ in range(1 + gets)]
    writer.close()
    assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * (1 + gets)
    return [json.loads(text) for _, _, text in answers]


@pytest.mark.parametrize("capped", [False, True], ids=["whole-frames", "part-written-frames"])
async def test_uploads_to_an_h2c_upstream_are_spliced_as_frames_beside_other_streams(
        sim, spliced, monkeypatch, capped):
    """Eight uploads and their GETs at once over the proxy's h2c connection to the simulator,
    which checks every signature and hashes every body: the frames put together in the kernel
    interleave correctly with other streams' frames, also when every frame is part-written."""
    if capped:
        real = os.splice
        monkeypatch.setattr(os, "splice", lambda src, dst, count, *a, **k: real(src, dst, min(count, 3000), *a, **k))
    bodies = [os.urandom((1 << 20) + 1000 * i) for i in range(8)]
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy:
        results = await asyncio.gather(*(_post_and_get_on(proxy.port, body, 2) for body in bodies))
    for body, (upload, *gets) in zip(bodies, results):
        assert upload["protocol"] == "HTTP/2" and upload["principal"] == PRINCIPAL
        assert upload["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert [g["path"] for g in gets] == ["/get0", "/get1"]
    if not capped:
        assert sum(spliced) / 2 > 6 * (1 << 20)  # most of the bodies went through the kernel


@pytest.mark.parametrize("splice_on", [True, False], ids=["spliced", "streamed"])
async def test_a_spliced_upload_ends_its_stream_on_its_last_data_frame(spliced, splice_on):
    """The spliced body's last DATA frame carries END_STREAM: no empty DATA frame after it (one
    write and one segment fewer an upload). Streamed bodies still end with an empty one."""
    body = os.urandom((1 << 20) + 12345)
    async with H2TestServer(H2Script()) as server, running_proxy(
            upstream=f"http://127.0.0.1:{server.port}", upstream_protocol="h2",
            splice=splice_on) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for _ in range(2):  # the connection goes on after each
            writer.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body)) + body)
            status, _, text = await asyncio.wait_for(read_response(reader), 30)
            assert status == b"HTTP/1.1 200 OK"
            assert json.loads(text)["body_sha256"] == hashlib.sha256(body).hexdigest()
        writer.close()
    assert (sum(spliced) > 1 << 20) == splice_on
    assert server.stats.empty_data_frames == (0 if splice_on else 2)


async def test_a_client_gone_mid_upload_leaves_the_h2c_connection_working(sim, small_splices, monkeypatch):
    """A client that disconnects while its upload's frames are being part-written (the upstream
    socket made slow to become writable): its stream is reset, and uploads on the same upstream
    connection keep verifying."""
    from sigv4proxy.upstream.lean_h2 import connection as lean_connection

    real_wait = lean_connection.wait_writable

    async def slow_writable(fd, timeout):
        await asyncio.sleep(0.005)
        return await real_wait(fd, timeout)

    monkeypatch.setattr(lean_connection, "wait_writable", slow_writable)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy:
        gone = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /gone HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                         % (HOST, 8 << 20) + os.urandom(1 << 20))
            gone.append(writer)
        others = asyncio.gather(*(_post_and_get_on(proxy.port, os.urandom(1 << 20), 1) for _ in range(3)))
        await asyncio.sleep(0.1)
        for writer in gone:
            writer.transport.abort()  # gone mid-body
        results = await asyncio.wait_for(others, 60)
        assert all(upload["protocol"] == "HTTP/2" and upload["principal"] == PRINCIPAL for upload, _ in results)
        conns = [c for pool in proxy.pool._pools.values() for c in pool.connections]
        assert len(conns) == 1 and not conns[0].is_closed()  # the one connection, still up
        # The uploads of the clients gone end too.
        assert await eventually(lambda: proxy.exchange.inflight == 0, timeout=5)


async def test_a_frame_source_released_while_its_frame_is_being_finished_keeps_the_pipe_until_then():
    """The stream that owned a part-written frame may end first (cancelled): the pipe holding the
    rest of the frame must stay open for the task finishing it, and is dropped only after."""
    loop = asyncio.get_running_loop()
    splice._free.clear()  # noqa: SLF001
    async with _Route() as r:
        await loop.sock_sendall(r.client, b"b" * 5000)
        source = splice.FrameSource(os.dup(r.src.fileno()), 5000, 5)
        assert await source.wait_data() == 5000
        await source.assemble(b"H" * 9, 5000)
        pipe_read_end = source._pipe[0]
        source.finisher = loop.create_future()
        src = source.release()
        os.close(src)
        os.fstat(pipe_read_end)  # still open: the finisher still needs it
        source.finisher.set_result(None)
        await asyncio.sleep(0)
        with pytest.raises(OSError):
            os.fstat(pipe_read_end)  # then dropped (not reused: it still held bytes)
        assert splice._free == []
