"""The lean inbound HTTP/1.1 protocol's own edges, each answered as the aiohttp reference answers.

Every shape goes as raw bytes on a fresh connection to a proxy of each implementation in front of
the Lattice simulator (which verifies and records what reaches it): the answers (status and error
kind, in order), whether the connection closed after them and the paths that reached the upstream
must be the same for both. The shapes are the request-smuggling ones (CL+TE, duplicate
Content-Length, bad chunk sizes, obs-fold, bare LF), oversized lines (also dribbled in pieces),
and what only an own parser has to get right: a pipelined request after a malformed one, an
upgrade offer or CONNECT whose following bytes must never be read as a request, HTTP/1.0
keep-alive, versions other than 1.x. Then the lean path's request trailers: forwarded, except
fields that have no place after a body (checked on the upstream's side by h11).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from support.differential_upstream import Reply, ScriptedUpstream
from support.proxy import LATTICE_HOST, running_proxy, write_identities
from test_faults_upstream import read_response

from sigv4proxy.sim.identities import IdentityStore

H = LATTICE_HOST.encode()
LEAK = b"LEAKED-MARKER-9c1e"
IMPLEMENTATIONS = ("aiohttp", "lean")


def get(path: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + path + b" HTTP/" + version + b"\r\nHost: " + H + b"\r\n" + extra + b"\r\n"


def post(path: bytes, headers: bytes, body: bytes = b"") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: " + H + b"\r\n" + headers + b"\r\n" + body


SMUGGLED = get(b"/smuggled")

SHAPES = {
    "CL and TE, a request in the body": post(b"/a", b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                                             b"0\r\n\r\n" + SMUGGLED),
    "TE and CL, a request in the body": post(b"/a", b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
                                             b"0\r\n\r\n" + SMUGGLED),
    "duplicate CL, same value": post(b"/a", b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
    "duplicate CL, different values": post(b"/a", b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    "CL with a space inside": post(b"/a", b"Content-Length: 1 0\r\n", b"0123456789"),
    "chunk size not hex": post(b"/a", b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk size overflow": post(b"/a", b"Transfer-Encoding: chunked\r\n", b"f" * 20 + b"\r\nabc\r\n0\r\n\r\n"),
    "chunk data longer than its size": post(b"/a", b"Transfer-Encoding: chunked\r\n",
                                            b"3\r\nabcdef\r\n0\r\n\r\n" + SMUGGLED),
    "chunked body cut by a request": post(b"/a", b"Transfer-Encoding: chunked\r\n", b"5\r\nab\r\n" + SMUGGLED),
    "obs-fold": get(b"/a", b"X-A: one\r\n " + LEAK + b"\r\n"),
    "bare LF line endings": b"GET /a HTTP/1.1\nHost: " + H + b"\nX-A: " + LEAK + b"\n\n",
    "bare CR in a value": get(b"/a", b"X-A: a\rInjected: " + LEAK + b"\r\n"),
    "NUL in the target": b"GET /a\x00" + LEAK + b" HTTP/1.1\r\nHost: " + H + b"\r\n\r\n",
    "request line too long": get(b"/" + LEAK + b"a" * 40000),
    "header value too long": get(b"/a", b"X-Big: " + LEAK + b"a" * 20000 + b"\r\n"),
    "too many headers": get(b"/a", b"".join(b"X-%d: v\r\n" % i for i in range(200))),
    "HTTP/0.9 request line": b"GET /a HTTP/0.9\r\nHost: " + H + b"\r\n\r\n",
    "HTTP/2.0 request line": b"GET /a HTTP/2.0\r\nHost: " + H + b"\r\n\r\n",
    "pipelined: good, malformed, good": get(b"/first") + b"GET /x HTTP/1.1\r\nBad Name: v\r\n\r\n" + get(b"/third"),
    "CONNECT, then a request": b"CONNECT " + H + b":443 HTTP/1.1\r\nHost: " + H + b":443\r\n\r\n" + SMUGGLED,
    "websocket upgrade": get(b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n"),
    "h2c offer, then a request": get(b"/offer", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                     b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n") + get(b"/after"),
    "h2c offer with a body holding a request": post(
        b"/offer", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
    "HTTP/1.0 with keep-alive, twice": get(b"/one", b"Connection: keep-alive\r\n", b"1.0")
    + get(b"/two", b"", b"1.0"),
    "HTTP/1.1 with Connection: close, then more": get(b"/one", b"Connection: close\r\n") + get(b"/two"),
    "absolute-form target": b"GET http://" + H + b"/abs?q=1 HTTP/1.1\r\nHost: " + H + b"\r\n\r\n",
}


@dataclass(frozen=True)
class Conversation:
    answers: list[tuple[int, str | None]]  # (status, x-sigv4proxy-error) in order
    closed: bool  # the proxy closed the connection after them
    leaked: bool  # an answer echoed request bytes
    forwarded: list[str]  # paths that reached the upstream, in order


BAD = (400, "bad_request")
# Where the lean path answers otherwise on purpose: its conversation and why. Strict: the day the
# reference answers the same, the entry goes.
INTENDED = {
    "HTTP/0.9 request line": (Conversation([BAD], True, False, []),
                              "only HTTP/1.0 and 1.1 messages are framed as HTTP/1.1; aiohttp forwards it"),
    "HTTP/2.0 request line": (Conversation([BAD], True, False, []),
                              "only HTTP/1.0 and 1.1 messages are framed as HTTP/1.1; aiohttp forwards it"),
    "pipelined: good, malformed, good": (
        Conversation([(200, None), BAD], True, False, ["/first"]),
        "what came before the malformed request is answered, in order; aiohttp answers the 400 alone"),
    "CONNECT, then a request": (
        Conversation([(405, "method_not_supported")], True, False, []),
        "nothing after a CONNECT head is read (it may be tunnel bytes); aiohttp serves it as a request"),
    "h2c offer, then a request": (
        Conversation([(200, None), (200, None)], False, False, ["/offer", "/after"]),
        "the declined offer's connection goes on in HTTP/1.1; aiohttp never answers the pipelined request"),
    "h2c offer with a body holding a request": (
        Conversation([BAD], True, False, []),
        "llhttp skips the body of an upgrade offer, so where the next request starts is not known: refused "
        "and closed; aiohttp forwards it"),
    "HTTP/1.1 with Connection: close, then more": (
        Conversation([(200, None)], True, False, ["/one"]),
        "the request before the close is answered, the bytes after it ignored; aiohttp answers 400 alone"),
}


async def converse(port: int, data: bytes, sim, pieces: int = 1) -> Conversation:
    """Sends `data` (in `pieces` writes 50 ms apart), reads every answer until the proxy closes
    or stays silent, and what reached the upstream."""
    before = len(sim.records)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers, closed, leaked = [], False, False
    try:
        size = -(-len(data) // pieces)
        for i in range(0, len(data), size):
            if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]  # answered: stop sending
                break
            writer.write(data[i:i + size])
            await asyncio.sleep(0.05 if pieces > 1 else 0)
        for _ in range(8):
            try:
                head = await asyncio.wait_for(reader.read(1), 1.0)
            except TimeoutError:
                break
            if not head:
                closed = True
                break
            reader._buffer[:0] = head  # type: ignore[attr-defined]  # put the probe byte back
            response = await read_response(reader)
            answers.append((response.status, response.header("x-sigv4proxy-error")))
            leaked = leaked or LEAK in response.body
            if response.eof:
                closed = True
                break
    finally:
        writer.close()
    await asyncio.sleep(0.05)  # an upstream record lands after the answer
    return Conversation(answers, closed, leaked, [r["requestPath"] for r in sim.records[before:]])


@pytest.mark.parametrize("name", SHAPES)
async def test_lean_answers_each_shape_as_the_aiohttp_reference_does(sim, name):
    seen = {}
    for implementation in IMPLEMENTATIONS:
        async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                                 h1_implementation=implementation) as proxy:
            seen[implementation] = await converse(proxy.port, SHAPES[name], sim)
    lean = seen["lean"]
    if name in INTENDED:
        expected, why = INTENDED[name]
        assert lean == expected, (why, seen)
        assert seen["aiohttp"] != lean, f"the reference now answers as the lean path: drop {name!r} from INTENDED"
    else:
        assert lean == seen["aiohttp"], seen
    assert lean.answers and not lean.leaked
    assert "/smuggled" not in lean.forwarded  # never parsed out of a body as a request of its own


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
async def test_a_header_line_dribbled_past_the_limit_is_refused_before_it_ends(sim, implementation):
    """A never-ending header line (no LF yet) is refused once past the limit, not buffered on."""
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                             h1_implementation=implementation) as proxy:
        endless = b"GET /a HTTP/1.1\r\nHost: " + H + b"\r\nX-Endless: " + b"a" * 40000
        seen = await converse(proxy.port, endless, sim, pieces=8)
    assert seen.answers == [(431, "headers_too_large")] and seen.closed and not seen.forwarded


async def test_request_trailers_are_forwarded_without_fields_that_have_no_place_after_a_body(tmp_path):
    """A chunked upload's trailers reach an HTTP/1.1 upstream after its last chunk (h11 reads
    them); framing, routing, hop-by-hop and signing fields among them do not (the proxy is the only
    signer, and the signature covers the head alone)."""
    identities = IdentityStore.load(write_identities(tmp_path))
    async with ScriptedUpstream(lambda target: Reply(chunks=((0, b"ok"),)), identities) as upstream:
        async with running_proxy(upstream=f"http://127.0.0.1:{upstream.ports['http1']}",
                                 upstream_protocol="http1", h1_implementation="lean") as proxy:
            # (a Content-Length among the trailers is refused by llhttp itself, as in the head)
            trailers = (b"X-Checksum: abc\r\nAuthorization: AWS4-HMAC-SHA256 forged\r\nX-Amz-Date: 20990101T000000Z\r\n"
                        b"Host: evil.example\r\nConnection: close\r\nX-Done: 1\r\n")
            request = post(b"/up", b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Done\r\n",
                           b"3\r\nabc\r\n2\r\nde\r\n0\r\n" + trailers + b"\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(request)
                response = await read_response(reader)
            finally:
                writer.close()
    assert response.status == 200 and response.body == b"ok"
    (arrival,) = upstream.arrivals
    assert arrival.body == b"abcde" and arrival.verdict.startswith("arn:aws:sts::")
    assert [(n.lower(), v) for n, v in arrival.trailers] == [(b"x-checksum", b"abc"), (b"x-done", b"1")]


async def test_pipelined_answers_before_a_half_close_all_arrive_in_order(sim):
    """Three requests and a half-close in one go: every one is answered, in order, then close."""
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                             h1_implementation="lean") as proxy:
        sim.records.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(get(b"/1") + post(b"/2", b"Content-Length: 3\r\n", b"abc") + get(b"/3"))
            writer.write_eof()
            statuses = [(await read_response(reader)).status for _ in range(3)]
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
    assert statuses == [200, 200, 200]
    assert [r["requestPath"] for r in sim.records] == ["/1", "/2", "/3"]


async def _download(port: int, size: int, *, read_every: float | None, chunk: int = 256 * 1024,
                    bound: float = 20.0) -> tuple[int, bool]:
    """GETs `size` bytes from the simulator through the proxy on a socket with a small receive
    buffer; reads nothing (`read_every` None: until the proxy cuts the connection) or `chunk`
    bytes every `read_every` s. Returns (body bytes read, whether the connection was cut short)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    try:
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: " + H
                                + b"\r\nx-sim-response-bytes: %d\r\n\r\n" % size)
        received, deadline = b"", loop.time() + bound
        while loop.time() < deadline:
            if read_every is None:
                await asyncio.sleep(0.2)
                if loop.time() < deadline - bound / 2:
                    continue  # taking nothing for the first half of the bound
                read_every = 0.0  # then draining what is left, to see how it ends
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, chunk), bound)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            received += data
            head_end = received.find(b"\r\n\r\n")
            if head_end >= 0 and len(received) - head_end - 4 >= size:
                return size, False
            await asyncio.sleep(read_every)
        head_end = received.find(b"\r\n\r\n")
        return (len(received) - head_end - 4 if head_end >= 0 else 0), True
    finally:
        sock.close()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
async def test_a_client_that_takes_nothing_of_its_answer_is_cut_after_the_read_timeout(sim, implementation):
    """A client that stops reading its answer would hold its request, and the upstream stream,
    for ever: after --read-timeout with nothing taken its connection is aborted, the request ends
    and the answer arrives cut short (as nginx's send_timeout). A slow client that keeps taking
    bytes is never cut."""
    size = 64 << 20
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2", read_timeout=1,
                             h1_implementation=implementation) as proxy:
        stalled = asyncio.ensure_future(_download(proxy.port, size, read_every=None, bound=8.0))
        await asyncio.sleep(0.5)
        assert proxy.exchange.inflight == 1  # the answer is under way, held back by the client
        for _ in range(70):  # 1 s of timeout, then the cut: inside the client's 4 s of silence
            if proxy.exchange.inflight == 0:
                break
            await asyncio.sleep(0.05)
        assert proxy.exchange.inflight == 0
        got, cut = await stalled
        assert cut and got < size
        steady = await _download(proxy.port, 8 << 20, read_every=0.005, bound=30.0)  # a few MB/s
    assert steady == (8 << 20, False)
