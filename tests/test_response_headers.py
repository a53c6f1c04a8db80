"""Response headers on the way back to the client: names spelled as the upstream sent them, in
order, repeats kept; hop-by-hop fields dropped; Content-Length recomputed from the real framing.
The upstream is a raw HTTP/1.1 socket, so the bytes it sends are exactly the ones written here."""

from __future__ import annotations

import pytest
from support.proxy import LATTICE_HOST, running_proxy
from support.upstream_servers import RawResponseServer
from test_faults_upstream import raw_request

HOST = LATTICE_HOST.encode()


def _response(framing: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 201 Created\r\n"
            b"X-Trace: one\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Set-Cookie: a=1\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"x-Mixed-CASE: Kept\r\n"
            b"Set-Cookie: b=2\r\n"
            b"Trailer: X-Never\r\n"
            b"Upgrade: h2c\r\n"
            + framing + b"\r\n" + body)


@pytest.mark.parametrize("framing, body", [
    (b"Content-Length: 5\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"),
], ids=["content-length", "chunked"])
async def test_names_order_and_repeats_kept_hop_by_hop_dropped(framing, body):
    async with RawResponseServer(_response(framing, body), close=True) as upstream:
        async with running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="http1") as proxy:
            for _ in range(2):  # the second time through, names come from the proxy's name cache
                resp = await raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST)
                assert resp.status == 201 and resp.body == b"hello"
                names = [n for n, _ in resp.headers]
                assert [(n, v) for n, v in resp.headers if n.lower() in ("x-trace", "set-cookie", "x-mixed-case")] \
                    == [("X-Trace", "one"), ("Set-Cookie", "a=1"), ("x-Mixed-CASE", "Kept"), ("Set-Cookie", "b=2")]
                lowered = {n.lower() for n in names}
                assert not lowered & {"keep-alive", "proxy-connection", "upgrade"}
                assert resp.header("trailer") == "X-Never"  # end-to-end (RFC 9110 §6.6.2): kept
                if framing.startswith(b"Content-Length"):
                    assert resp.header("content-length") == "5"
