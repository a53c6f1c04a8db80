"""No failed request from the way VPC Lattice treats connections: a reused connection that closes
under a request before any answer (the idle-close race) is retried once on a new connection when
the request is idempotent and its body can be sent again, and a connection past its age takes
nothing new and closes once its last answer is done, before Lattice's own cut.

The scripted upstream checks each request's signature from the bytes that arrived with the
simulator's verifier (written independently of the proxy's signer), the retried ones included.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from support.proxy import LATTICE_HOST, running_proxy, write_identities
from support.scripted_upstream import Exchange, ScriptedUpstream

from sigv4proxy.sim.identities import IdentityStore
from sigv4proxy.sim.verify import RequestView, VerifyContext, verify_request

HOST = LATTICE_HOST.encode()
UPSTREAMS = pytest.mark.parametrize("upstream_protocol", ["http1", "h2"])
WAIT = 10.0


class Verifier:
    """Each request's signature recomputed from what the upstream received."""

    def __init__(self, tmp_path) -> None:
        self.identities = IdentityStore.load(str(write_identities(tmp_path)))

    def __call__(self, ex: Exchange) -> str:
        import time

        path, _, query = ex.path.decode("latin-1").partition("?")
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in ex.headers if n != b"host"]
        headers.append(("host", ex.authority.decode("latin-1")))
        view = RequestView(ex.method.decode(), path, query, headers)
        ctx = VerifyContext(self.identities, "us-west-2", "vpc-lattice-svcs", time.time())
        return verify_request(view, ctx).identity.principal


async def request(port: int, method: bytes, path: bytes, body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        length = b"Content-Length: %d\r\n" % len(body) if body or method in (b"PUT", b"POST") else b""
        writer.write(b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, path, HOST, length) + body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        status_line, *lines = head[:-4].split(b"\r\n")
        fields = {n.strip().lower(): v.strip() for n, _, v in (line.partition(b":") for line in lines)}
        length = 0 if method == b"HEAD" else int(fields.get(b"content-length", b"0"))
        answer = await asyncio.wait_for(reader.readexactly(length), WAIT)
        return int(status_line.split()[1]), fields, answer
    finally:
        writer.close()


def retries(proxy, reason: str) -> float:
    text = proxy.metrics.exposition().decode()
    found = re.search(r'^sigv4proxy_upstream_retries_total\{reason="%s"\} (\S+)$' % reason, text, re.M)
    return float(found.group(1)) if found else 0.0


async def answer(ex: Exchange, verify: Verifier) -> None:
    body = await ex.read_body()
    text = b"%s conn=%d len=%d" % (verify(ex).encode(), ex.connection, len(body))
    ex.head(200, [(b"x-conn", b"%d" % ex.connection)], length=len(text))
    if ex.method != b"HEAD":
        ex.data(text)
    ex.end()


# --- never answered ------------------------------------------------------------------------------

@UPSTREAMS
@pytest.mark.parametrize("method, body, retried", [
    (b"GET", b"", True), (b"HEAD", b"", True), (b"DELETE", b"", True), (b"PUT", b"x" * 1000, True),
    (b"OPTIONS", b"", True),
    (b"POST", b"x" * 1000, False),  # not idempotent: the upstream may have processed it
    (b"PUT", b"x" * 200_000, False),  # a streamed body already under way cannot be sent again
], ids=["GET", "HEAD", "DELETE", "PUT-small", "OPTIONS", "POST", "PUT-streamed"])
async def test_a_request_a_reused_connection_dropped_unanswered_is_retried_once_when_safe(
        tmp_path, upstream_protocol, method, body, retried):
    verify = Verifier(tmp_path)

    async def script(ex: Exchange) -> None:
        verify(ex)
        if ex.connection == 1 and ex.index == 2:
            ex.drop_connection()  # its idle close crossed the second request: nothing answered
            return
        await answer(ex, verify)

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        status, _, first = await request(proxy.port, b"GET", b"/first")
        assert status == 200 and first.endswith(b"conn=1 len=0")
        status, fields, text = await request(proxy.port, method, b"/second", body)
        if retried:
            assert status == 200 and fields[b"x-conn"] == b"2"
            if method != b"HEAD":
                assert text.endswith(b"conn=2 len=%d" % len(body))
            assert retries(proxy, "unanswered") == 1
            assert [(ex.connection, ex.index) for ex in upstream.exchanges] == [(1, 1), (1, 2), (2, 1)]
        else:
            assert status == 502 and fields[b"x-sigv4proxy-error"] == b"upstream_reset"
            assert retries(proxy, "unanswered") == 0
            assert len(upstream.exchanges) == 2  # never sent again


@UPSTREAMS
async def test_a_new_connection_dropped_unanswered_is_not_retried(upstream_protocol, tmp_path):
    """Nothing shows it was a stale connection (it never answered): the request may be what made
    the upstream drop it, so it is a 502, not a second try."""
    verify = Verifier(tmp_path)

    async def script(ex: Exchange) -> None:
        verify(ex)
        ex.drop_connection()

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol) as proxy:
        status, fields, _ = await request(proxy.port, b"GET", b"/")
        assert status == 502 and fields[b"x-sigv4proxy-error"] == b"upstream_reset"
        assert len(upstream.exchanges) == 1 and retries(proxy, "unanswered") == 0


# --- connection age ------------------------------------------------------------------------------

@UPSTREAMS
async def test_a_connection_past_its_age_finishes_its_answer_takes_nothing_new_and_is_closed_by_us(
        upstream_protocol, tmp_path):
    verify = Verifier(tmp_path)
    release = asyncio.Event()

    async def script(ex: Exchange) -> None:
        if ex.path == b"/slow":
            await asyncio.wait_for(release.wait(), WAIT)  # in flight while its connection ages
        await answer(ex, verify)

    async with ScriptedUpstream(upstream_protocol, script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol=upstream_protocol,
                          max_connection_age=0.3) as proxy:
        slow = asyncio.ensure_future(request(proxy.port, b"GET", b"/slow"))
        await asyncio.sleep(0.6)  # past the age (0.27-0.3 s)
        status, _, text = await request(proxy.port, b"GET", b"/next")
        assert status == 200 and text.endswith(b"conn=2 len=0")  # not on the aged connection
        assert not slow.done()
        release.set()
        status, _, text = await slow
        assert status == 200 and text.endswith(b"conn=1 len=0")  # the aged one finished its answer
        for _ in range(100):
            if 1 in upstream.closed_by_client:
                break
            await asyncio.sleep(0.02)
        assert 1 in upstream.closed_by_client  # retired by us, not cut by the server
        if upstream_protocol == "h2":
            assert 1 in upstream.goaways  # gracefully: our GOAWAY first
    assert retries(proxy, "unanswered") == 0


async def test_an_idle_connection_past_its_age_is_closed_and_the_next_request_opens_another(tmp_path):
    verify = Verifier(tmp_path)

    async def script(ex: Exchange) -> None:
        await answer(ex, verify)

    async with ScriptedUpstream("h2", script) as upstream, \
            running_proxy(upstream=upstream.url, upstream_protocol="h2", max_connection_age=0.3) as proxy:
        for expected in (1, 2, 3):
            status, _, text = await request(proxy.port, b"GET", b"/")
            assert status == 200 and text.endswith(b"conn=%d len=0" % expected)
            await asyncio.sleep(0.5)
        assert upstream.goaways[:2] == [1, 2] and upstream.closed_by_client[:2] == [1, 2]
