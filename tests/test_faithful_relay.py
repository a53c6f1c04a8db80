"""The relay passes on what the upstream sends when it sends it: each response part as it arrives,
1xx responses, `Expect: 100-continue` decided by the upstream, trailers, the reason phrase, a
broken body cut after every byte received; and h2 → HTTP/1.1 field translation.

Streaming is checked in lock step, not by timing: the scripted upstream sends its next part only
once the client has the previous one, so a proxy that holds a part back until the next arrives
never finishes (the old HTTP/1.1 writer did exactly that). Both upstream protocols run each case.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from grpc_support.h2client import H2TestClient
from support.proxy import LATTICE_HOST, running_proxy
from support.scripted_upstream import Exchange, ScriptedUpstream


HOST = LATTICE_HOST.encode()
WAIT = 5.0
UPSTREAMS = pytest.mark.parametrize("upstream_protocol", ["http1", "h2"])


class H1Client:
    """A raw HTTP/1.1 client that reads a response part by part."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.trailers: list[bytes] = []

    @classmethod
    async def connect(cls, port: int) -> H1Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def head(self) -> tuple[bytes, dict[bytes, bytes]]:
        """(status line, fields by lowercase name) of the next head, 1xx included."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        status_line, *lines = raw[:-4].split(b"\r\n")
        return status_line, {n.strip().lower(): v.strip() for n, _, v in (line.partition(b":") for line in lines)}

    async def chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None at its last chunk (trailer lines in `trailers`)."""
        size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), WAIT))[:-2], 16)
        if size:
            return (await asyncio.wait_for(self.reader.readexactly(size + 2), WAIT))[:-2]
        while (line := await asyncio.wait_for(self.reader.readuntil(b"\r\n"), WAIT)) != b"\r\n":
            self.trailers.append(line[:-2])
        return None

    async def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        return await asyncio.wait_for(self.reader.read(), WAIT)

    def close(self) -> None:
        self.writer.close()


def get(path: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path, HOST, extra)


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


# --- streaming ----------------------------------------------------------------------------------

@UPSTREAMS
async def test_an_http1_client_gets_the_head_and_each_event_before_the_next_is_sent(upstream_protocol):
    head_seen = asyncio.Event()
    got = [asyncio.Event() for _ in range(3)]

    async def script(ex: Exchange) -> None:
        ex.head(200, [(b"content-type", b"text/event-stream")])
        await wait(head_seen)
        for i, seen in enumerate(got):
            ex.data(b"data: %d\n\n" % i)
            await wait(seen)  # the next event only once the client has this one
        ex.end()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(get(b"/events"))
            status, fields = await client.head()
            assert status == b"HTTP/1.1 200 OK" and fields[b"transfer-encoding"] == b"chunked"
            head_seen.set()
            for i, seen in enumerate(got):
                assert await client.chunk() == b"data: %d\n\n" % i
                seen.set()
            assert await client.chunk() is None
        finally:
            client.close()


@UPSTREAMS
async def test_an_h2c_client_gets_each_event_before_the_next_is_sent(upstream_protocol):
    got = [asyncio.Event() for _ in range(3)]

    async def script(ex: Exchange) -> None:
        ex.head(200, [(b"content-type", b"text/event-stream")])
        for i, seen in enumerate(got):
            ex.data(b"data: %d\n\n" % i)
            await wait(seen)
        ex.end()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("GET", "/events", LATTICE_HOST)
        record = client.streams[sid]
        expected = b""
        for i, seen in enumerate(got):
            expected += b"data: %d\n\n" % i
            while bytes(record.body) != expected:
                record.data.clear()
                await wait(record.data)
            seen.set()
        record = await client.wait(sid)
        assert record.status == 200 and record.ended


@UPSTREAMS
@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_a_body_broken_mid_way_reaches_the_client_whole_so_far_then_the_connection_closes(
        upstream_protocol, framing):
    sent = asyncio.Event()

    async def script(ex: Exchange) -> None:
        ex.head(200, length=10 if framing == "length" else None)
        ex.data(b"abcde")
        await wait(sent)  # the client has the bytes that came before the break
        ex.cut()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(get())
            status, fields = await client.head()
            assert status == b"HTTP/1.1 200 OK"
            if framing == "chunked":
                assert await client.chunk() == b"abcde"
                sent.set()
                assert await client.rest() == b""  # closed with no last chunk: not a complete body
            else:
                assert fields[b"content-length"] == b"10"
                assert await asyncio.wait_for(client.reader.readexactly(5), WAIT) == b"abcde"
                sent.set()
                assert await client.rest() == b""  # closed 5 bytes short
        finally:
            client.close()


@UPSTREAMS
async def test_an_h2c_client_gets_the_data_before_the_break_then_a_reset(upstream_protocol):
    async def script(ex: Exchange) -> None:
        ex.head(200)
        ex.data(b"abcde")
        await asyncio.sleep(0.2)
        ex.cut()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        record = await client.wait(client.request("GET", "/", LATTICE_HOST))
        assert record.status == 200 and bytes(record.body) == b"abcde"
        assert record.reset_code is not None and not record.ended


# --- 1xx ----------------------------------------------------------------------------------------

EARLY_HINTS = [(b"link", b"</style.css>; rel=preload; as=style")]


def early_hints_script(seen: asyncio.Event):
    async def script(ex: Exchange) -> None:
        ex.informational(103, EARLY_HINTS)
        await wait(seen)  # the hints reach the client before the final answer exists
        ex.head(200, length=2)
        ex.data(b"ok")
        ex.end()
    return script


@UPSTREAMS
async def test_early_hints_reach_an_http1_client_before_the_answer(upstream_protocol):
    seen = asyncio.Event()
    async with ScriptedUpstream(upstream_protocol, early_hints_script(seen)) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(get())
            status, fields = await client.head()
            assert status == b"HTTP/1.1 103 Early Hints" and fields[b"link"] == EARLY_HINTS[0][1]
            seen.set()
            status, fields = await client.head()
            assert status == b"HTTP/1.1 200 OK"
            assert await asyncio.wait_for(client.reader.readexactly(2), WAIT) == b"ok"
        finally:
            client.close()


@UPSTREAMS
async def test_early_hints_reach_an_h2c_client_before_the_answer(upstream_protocol):
    seen = asyncio.Event()
    async with ScriptedUpstream(upstream_protocol, early_hints_script(seen)) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("GET", "/", LATTICE_HOST)
        record = client.streams[sid]
        for _ in range(100):
            if record.informational:
                break
            await asyncio.sleep(0.02)
        assert record.informational == [[(b":status", b"103"), *EARLY_HINTS]] and record.status is None
        seen.set()
        record = await client.wait(sid)
        assert record.status == 200 and bytes(record.body) == b"ok"


# --- Expect: 100-continue -----------------------------------------------------------------------

UPLOAD = bytes(range(256)) * 800  # 200 KiB: more than the proxy would ever read ahead


def upload_head(extra: bytes = b"") -> bytes:
    return (b"PUT /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nExpect: 100-continue\r\n%s\r\n"
            % (HOST, len(UPLOAD), extra))


async def answer_with_digest(ex: Exchange) -> None:
    body = await ex.read_body()
    digest = hashlib.sha256(body).hexdigest().encode()
    ex.head(200, length=len(digest))
    ex.data(digest)
    ex.end()


@UPSTREAMS
async def test_an_upstream_refusal_on_the_head_reaches_the_client_before_its_body(upstream_protocol):
    async def script(ex: Exchange) -> None:
        assert ex.header(b"expect") == b"100-continue"  # the expectation went upstream
        ex.head(413, [(b"content-type", b"text/plain")], length=8)
        ex.data(b"too big\n")
        ex.end()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(upload_head())  # and, like curl, no body before a 100
            status, fields = await client.head()
            assert status.startswith(b"HTTP/1.1 413 ")
            assert fields[b"connection"] == b"close"  # no body follows: the connection cannot go on
            assert await asyncio.wait_for(client.reader.readexactly(8), WAIT) == b"too big\n"
        finally:
            client.close()
    assert [bytes(ex.body) for ex in upstream.exchanges] == [b""]


@UPSTREAMS
async def test_the_upstreams_100_is_forwarded_once_and_the_upload_completes(upstream_protocol):
    async def script(ex: Exchange) -> None:
        ex.informational(100)
        await answer_with_digest(ex)

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(upload_head())
            status, _ = await client.head()
            assert status == b"HTTP/1.1 100 Continue"
            client.send(UPLOAD)
            status, fields = await client.head()  # the next head is the answer: one 100 only
            assert status == b"HTTP/1.1 200 OK" and b"connection" not in fields
            digest = await asyncio.wait_for(client.reader.readexactly(64), WAIT)
            assert digest == hashlib.sha256(UPLOAD).hexdigest().encode()
        finally:
            client.close()


@UPSTREAMS
async def test_an_upstream_that_says_nothing_gets_the_body_after_the_proxys_own_100(upstream_protocol):
    async with ScriptedUpstream(upstream_protocol, answer_with_digest) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            started = time.monotonic()
            client.send(upload_head())
            status, _ = await client.head()
            waited = time.monotonic() - started
            assert status == b"HTTP/1.1 100 Continue"
            assert waited >= 0.5  # it waited for the upstream's own answer first (1 s)
            client.send(UPLOAD)
            status, _ = await client.head()
            assert status == b"HTTP/1.1 200 OK"
            digest = await asyncio.wait_for(client.reader.readexactly(64), WAIT)
            assert digest == hashlib.sha256(UPLOAD).hexdigest().encode()
        finally:
            client.close()


@UPSTREAMS
@pytest.mark.parametrize("upstream_answer", ["refuses", "continues"])
async def test_an_h2c_clients_expectation_is_answered_by_the_upstream(upstream_protocol, upstream_answer):
    async def script(ex: Exchange) -> None:
        if upstream_answer == "refuses":
            ex.head(401, length=0)
            ex.end()
        else:
            ex.informational(100)
            await answer_with_digest(ex)

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("PUT", "/up", LATTICE_HOST, [("expect", "100-continue")], end_stream=False)
        record = client.streams[sid]
        for _ in range(250):
            if record.informational or record.status is not None:
                break
            await asyncio.sleep(0.02)
        if upstream_answer == "refuses":
            await client.wait(sid)
            assert record.status == 401 and not record.informational
            assert [bytes(ex.body) for ex in upstream.exchanges] == [b""]
        else:
            assert record.informational == [[(b":status", b"100")]]
            await client.send_data(sid, UPLOAD, end_stream=True)
            await client.wait(sid)
            assert record.status == 200 and bytes(record.body) == hashlib.sha256(UPLOAD).hexdigest().encode()


@UPSTREAMS
async def test_an_expecting_upload_through_the_simulator_is_verified(sim, upstream_protocol):
    """The forwarded `expect` field and the held body still verify at the receiving side."""
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(upload_head())
            status, _ = await client.head()
            assert status == b"HTTP/1.1 100 Continue"
            client.send(UPLOAD)
            status, fields = await client.head()
            assert status == b"HTTP/1.1 200 OK", status
            echo = await asyncio.wait_for(client.reader.readexactly(int(fields[b"content-length"])), WAIT)
            assert hashlib.sha256(UPLOAD).hexdigest().encode() in echo
        finally:
            client.close()


# --- trailers, reason phrase --------------------------------------------------------------------

@UPSTREAMS
async def test_response_trailers_reach_an_http1_client(upstream_protocol):
    async def script(ex: Exchange) -> None:
        # over h2 with a declared length: the proxy must still choose chunked to carry them
        ex.head(200, [(b"Trailer", b"x-checksum")], length=5 if upstream_protocol == "h2" else None)
        ex.data(b"hello")
        ex.end([(b"x-checksum", b"5d41402a")])

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(get())
            status, fields = await client.head()
            assert fields[b"trailer"] == b"x-checksum" and fields[b"transfer-encoding"] == b"chunked"
            assert b"content-length" not in fields
            assert await client.chunk() == b"hello" and await client.chunk() is None
            assert client.trailers == [b"x-checksum: 5d41402a"]
        finally:
            client.close()


async def test_an_http1_upstreams_own_reason_phrase_is_kept():
    async def script(ex: Exchange) -> None:
        ex.head(299, reason=b"Quite Custom", length=0)
        ex.end()

    async with ScriptedUpstream("http1", script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol="http1") as proxy:
        client = await H1Client.connect(proxy.port)
        try:
            client.send(get())
            status, _ = await client.head()
            assert status == b"HTTP/1.1 299 Quite Custom"
        finally:
            client.close()


# --- h2 → HTTP/1.1 field translation ------------------------------------------------------------

async def test_an_h2c_requests_cookie_crumbs_and_te_reach_an_http1_upstream_as_http1_says():
    async def script(ex: Exchange) -> None:
        ex.head(204)
        ex.end()

    async with ScriptedUpstream("http1", script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol="http1") as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        record = await client.wait(client.request("GET", "/", LATTICE_HOST, [
            ("cookie", "a=1"), ("te", "trailers"), ("x-other", "x"), ("cookie", "b=2")]))
        assert record.status == 204
    (ex,) = upstream.exchanges
    assert ex.all(b"cookie") == [b"a=1; b=2"]  # RFC 9113 §8.2.3: one field, crumbs joined
    assert ex.header(b"te") == b"trailers"
    assert b"te" in {t.strip().lower() for t in ex.header(b"connection").split(b",")}  # RFC 9110 §10.1.4


@UPSTREAMS
async def test_an_h2c_requests_trailers_reach_either_upstream(upstream_protocol):
    async def script(ex: Exchange) -> None:
        await ex.read_body()
        ex.head(204)
        ex.end()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("POST", "/", LATTICE_HOST, [("te", "trailers")], end_stream=False)
        await client.send_data(sid, b"x" * 100_000)  # more than the proxy reads whole
        client.send_trailers(sid, [("x-checksum", "abc")])
        record = await client.wait(sid)
        assert record.status == 204
    (ex,) = upstream.exchanges
    assert bytes(ex.body) == b"x" * 100_000 and ex.trailers == [(b"x-checksum", b"abc")]
