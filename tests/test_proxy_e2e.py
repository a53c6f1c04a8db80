"""The proxy end to end over real sockets: app → proxy → Lattice simulator (which re-verifies SigV4
from the bytes that arrived), over h2c, TLS h2 and HTTP/1.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import aiohttp
import pytest
from multidict import CIMultiDict

from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy

PROTOCOLS = ["h2", "http1"]


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def via(sim, protocol="h2", **extra):
    return dict(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=protocol, **extra)


async def get_json(client, url, **kw):
    async with client.request(kw.pop("method", "GET"), url, **kw) as resp:
        body = await resp.read()
        return resp, body


@pytest.mark.parametrize("protocol, impl", [("h2", "lean"), ("h2", "h2"), ("http1", "lean")])
async def test_signed_request_verifies_at_the_simulator(sim, client, protocol, impl):
    async with running_proxy(**via(sim, protocol, h2_implementation=impl)) as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/hello?b=2&a=1",
                                    headers={"Host": LATTICE_HOST})
    assert resp.status == 200, body
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL
    assert echo["protocol"] == ("HTTP/2" if protocol == "h2" else "HTTP/1.1")
    assert echo["authority"] == LATTICE_HOST
    assert echo["path"] == "/hello" and echo["query"] == "b=2&a=1"
    signed = echo["signed_headers"]
    for name in ("host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"):
        assert name in signed


async def test_tls_h2_upstream_with_trustme(client, tls_sim):
    server, ca = tls_sim
    async with running_proxy(upstream=f"https://127.0.0.1:{server.port}", ca_bundle=ca) as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/tls", headers={"Host": LATTICE_HOST})
        assert resp.status == 200, body
        assert json.loads(body)["protocol"] == "HTTP/2"
    # Without the CA the certificate is refused: verification is on by default.
    async with running_proxy(upstream=f"https://127.0.0.1:{server.port}") as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/tls", headers={"Host": LATTICE_HOST})
        assert resp.status == 502 and resp.headers["x-sigv4proxy-error"] == "upstream_connect"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "target",
    [
        "/a%20b/c%2Fd/~user/%E2%82%AC",
        "/dots/./x/../y//z",
        "/q?x=%2F&y=a+b&y=a&empty&=novalue&k=",
        "/q?b=2&a=3&a=1&A=0",
        "/unicode/%F0%9F%98%80?%F0%9F%98%80=%F0%9F%98%80",
        "/reserved/!$'()*,;:@?sp=a%20b&st=a*b",
    ],
)
async def test_odd_paths_and_queries_are_forwarded_untouched_and_verify(sim, protocol, target):
    async with running_proxy(**via(sim, protocol)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {LATTICE_HOST}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    if b"chunked" in head.lower():
        body = _dechunk(body)
    echo = json.loads(body)
    path, _, query = target.partition("?")
    assert echo["path"] == path and echo["query"] == query


def _dechunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_repeated_headers_in_order_and_client_signing_headers_replaced(sim, client, protocol):
    headers = [("Host", LATTICE_HOST), ("X-Multi", "one"), ("X-Multi", "two"),
               ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDFORGED/x"), ("X-Amz-Date", "19990101T000000Z"),
               ("X-Amz-Security-Token", "forged"), ("X-Amz-Content-Sha256", "deadbeef"),
               ("Connection", "keep-alive, X-Hop"), ("X-Hop", "must-not-pass"), ("Keep-Alive", "timeout=5")]
    async with running_proxy(**via(sim, protocol)) as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/h", headers=CIMultiDict(headers))
    assert resp.status == 200, body
    received = json.loads(body)["headers"]
    names = [n.lower() for n, _ in received]
    assert [v for n, v in received if n.lower() == "x-multi"] == ["one", "two"]
    assert "x-hop" not in names and "keep-alive" not in names
    dates = [v for n, v in received if n.lower() == "x-amz-date"]
    assert len(dates) == 1 and dates[0] != "19990101T000000Z"
    assert [v for n, v in received if n.lower() == "x-amz-content-sha256"] == ["UNSIGNED-PAYLOAD"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_header_options_and_extra_signed_headers_verify(sim, client, protocol):
    """--add-header, --strip-header, --duplicate-header and extra signed headers together: the
    simulator recomputes the signature over what arrived (x-team and content-type included)."""
    headers = [("Host", LATTICE_HOST), ("Content-Type", "application/json"),
               ("Authorization", "Bearer app-token"), ("X-Secret", "drop-me"), ("Accept", "*/*")]
    async with running_proxy(**via(sim, protocol, add_header=("x-team=pay",),
                                   strip_header=("X-Secret",), duplicate_header=("Authorization",),
                                   extra_signed_headers=("x-team", "content-type"))) as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/opts",
                                    headers=CIMultiDict(headers))
    assert resp.status == 200, body
    echo = json.loads(body)
    assert {"x-team", "content-type", "host"} <= set(echo["signed_headers"])
    received = [(n.lower(), v) for n, v in echo["headers"]]
    assert ("x-team", "pay") in received and ("content-type", "application/json") in received
    assert ("x-original-authorization", "Bearer app-token") in received
    assert all(n != "x-secret" for n, _ in received)
    assert len([n for n, _ in received if n == "authorization"]) == 1  # ours (the echo redacts it)


@pytest.mark.parametrize("protocol", PROTOCOLS + ["h2-reference"])
async def test_big_bodies_stream_both_ways(sim, client, protocol):
    size = 24 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256(block * (size // len(block))).hexdigest()

    async def upload():
        for _ in range(size // len(block)):
            yield block

    extra = {"h2_implementation": "h2"} if protocol == "h2-reference" else {}
    async with running_proxy(**via(sim, protocol.replace("-reference", ""), **extra)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/upload"
        async with client.post(url, data=upload(), headers={"Host": LATTICE_HOST}) as resp:
            echo = json.loads(await resp.read())
        assert resp.status == 200
        assert echo["body_length"] == size and echo["body_sha256"] == digest
        async with client.get(url, headers={"Host": LATTICE_HOST, "x-sim-response-bytes": str(size)}) as resp:
            h = hashlib.sha256()
            total = 0
            async for chunk in resp.content.iter_any():
                h.update(chunk)
                total += len(chunk)
            assert resp.status == 200 and total == size
            assert h.hexdigest() == resp.headers["x-sim-body-sha256"]


async def test_many_concurrent_requests_share_few_h2_connections(sim, client):
    async with running_proxy(**via(sim, "h2")) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/c"

        async def one(i):
            async with client.get(f"{url}?i={i}", headers={"Host": LATTICE_HOST}) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        stats = proxy.pool.stats()
    assert statuses == [200] * 200
    total = sum(n for (proto, _), n in stats.connections.items() if proto == "h2")
    assert 1 <= total <= 2, stats


async def test_default_config_does_not_cap_http1_concurrency_at_a_handful(sim, client):
    """Over HTTP/1.1 each in-flight request needs its own upstream socket, so the per-origin
    connection limit is a concurrency cap: at the old default of 8, a 100 ms service behind a
    2-worker sidecar topped out at 160 requests a second. 64 slow requests all reach it at once."""
    async with running_proxy(**via(sim, "http1", first_byte_timeout=20)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/slow"

        async def one(i):
            headers = {"Host": LATTICE_HOST, "x-sim-delay-ms": "6000"}
            async with client.get(f"{url}?i={i}", headers=headers) as resp:
                await resp.read()
                return resp.status

        calls = asyncio.gather(*(one(i) for i in range(64)))
        active = 0
        for _ in range(110):  # bounded: 5.5 s (of the 6 s each takes) to see all 64 open at once
            stats = proxy.pool.stats()
            active = stats.connections.get(("http1", "active"), 0)
            if active == 64:
                break
            await asyncio.sleep(0.05)
        statuses = await asyncio.wait_for(calls, 30)
    assert active == 64, stats
    assert statuses == [200] * 64


async def test_forward_proxy_absolute_form(sim, client):
    async with running_proxy(**via(sim, "h2")) as proxy:
        async with client.get(f"http://{LATTICE_HOST}/fwd?x=1", proxy=f"http://127.0.0.1:{proxy.port}") as resp:
            echo = json.loads(await resp.read())
    assert resp.status == 200
    assert echo["authority"] == LATTICE_HOST and echo["path"] == "/fwd" and echo["query"] == "x=1"


async def test_host_outside_allow_list_is_refused_and_never_contacted(sim, client):
    async with running_proxy(**via(sim, "h2")) as proxy:
        for host in ("example.com", "169.254.169.254", LATTICE_HOST + ".evil.com"):
            resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/x", headers={"Host": host})
            assert resp.status == 403, body
            assert resp.headers["x-sigv4proxy-error"] == "host_not_allowed"
            assert resp.headers.getall("Server") == ["sigv4proxy"]  # no Python/aiohttp versions
        async with client.get("http://example.com/x", proxy=f"http://127.0.0.1:{proxy.port}") as resp:
            assert resp.status == 403
    assert sim.records == [] or all(r.get("hostHeader") == LATTICE_HOST for r in sim.records)
    assert len(sim.records) == 0


async def test_connect_and_upgrade_are_refused(sim):
    async with running_proxy(**via(sim, "h2")) as proxy:
        for request, status in (
            (f"CONNECT {LATTICE_HOST}:443 HTTP/1.1\r\nHost: {LATTICE_HOST}:443\r\n\r\n", b"405"),
            (f"GET / HTTP/1.1\r\nHost: {LATTICE_HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", b"400"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(request.encode())
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert line.split()[1] == status, line
    assert len(sim.records) == 0


async def test_an_h2c_upgrade_offer_is_answered_in_http1_on_a_kept_connection(sim):
    # What `curl --http2 http://...` sends: the proxy declines the upgrade (no 101), signs and
    # forwards the request without the upgrade fields, and keeps the connection for the next one.
    offer = (f"GET /first HTTP/1.1\r\nHost: {LATTICE_HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
             "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    plain = f"GET /second HTTP/1.1\r\nHost: {LATTICE_HOST}\r\n\r\n"
    async with running_proxy(**via(sim, "h2")) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for request, path in ((offer, "/first"), (plain, "/second")):
                writer.write(request.encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                lines = head.decode("latin-1").split("\r\n")
                assert lines[0].startswith("HTTP/1.1 200"), lines[0]
                fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
                assert "upgrade" not in fields
                body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 5)
                echo = json.loads(body)
                assert echo["principal"] == PRINCIPAL and echo["path"] == path
                sent = {name for name, _ in echo["headers"]}
                assert not sent & {"upgrade", "http2-settings", "connection"}
        finally:
            writer.close()


async def test_dead_upstream_is_502_and_stalled_is_504(client):
    # A port with nothing listening: bind then close to get one.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    async with running_proxy(upstream=f"http://127.0.0.1:{dead_port}", upstream_protocol="h2") as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/", headers={"Host": LATTICE_HOST})
        assert resp.status == 502 and resp.headers["x-sigv4proxy-error"] == "upstream_connect"
        assert b"sigv4proxy:" in body

    accepted = []

    async def stall(reader, writer):
        accepted.append(writer)
        await reader.read(65536)  # read the request, answer nothing

    stalled = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = stalled.sockets[0].getsockname()[1]
    try:
        async with running_proxy(upstream=f"http://127.0.0.1:{port}", upstream_protocol="http1",
                                 first_byte_timeout=0.5) as proxy:
            resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/", headers={"Host": LATTICE_HOST})
            assert resp.status == 504 and resp.headers["x-sigv4proxy-error"] == "upstream_timeout"
    finally:
        for w in accepted:
            w.close()
        stalled.close()
        await stalled.wait_closed()


async def test_no_credentials_fails_closed_and_forwards_nothing(sim, client):
    from sigv4proxy.aws.credentials import CredentialStore
    from sigv4proxy.aws.signing import Credentials

    class Broken:
        def fetch(self) -> Credentials:
            raise RuntimeError("endpoint down")

    store = CredentialStore(Broken())
    async with running_proxy(credentials=store, **via(sim, "h2")) as proxy:
        resp, body = await get_json(client, f"http://127.0.0.1:{proxy.port}/", headers={"Host": LATTICE_HOST})
        assert resp.status == 503 and resp.headers["x-sigv4proxy-error"] == "credentials_unavailable"
        assert resp.headers["Retry-After"]
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as ready:
            assert ready.status == 503
    assert len(sim.records) == 0


async def test_admin_endpoints_and_metrics(sim, client):
    async with running_proxy(**via(sim, "h2")) as proxy:
        resp, _ = await get_json(client, f"http://127.0.0.1:{proxy.port}/m", headers={"Host": LATTICE_HOST})
        assert resp.status == 200
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        async with client.get(admin + "/healthz") as r:
            assert r.status == 200
        async with client.get(admin + "/readyz") as r:
            assert r.status == 200
        async with client.get(admin + "/nope") as r:
            assert r.status == 404 and r.headers.getall("Server") == ["sigv4proxy"]
        async with client.get(admin + "/metrics") as r:
            text = await r.text()
            assert r.headers.getall("Server") == ["sigv4proxy"]  # no Python/aiohttp versions
    assert 'sigv4proxy_request_duration_seconds_count{code_class="2xx",method="GET",route="upstream"} 1.0' in text
    assert "sigv4proxy_signing_duration_seconds_count 1.0" in text
    assert 'sigv4proxy_upstream_duration_seconds_count{protocol="HTTP/2"} 1.0' in text
    assert 'sigv4proxy_upstream_connections{protocol="h2",state=' in text
    assert "sigv4proxy_credentials_expiry_timestamp_seconds" in text


async def test_inflight_gauge_counts_requests_in_progress(sim, client):
    async with running_proxy(**via(sim, "h2")) as proxy:
        slow = asyncio.create_task(get_json(client, f"http://127.0.0.1:{proxy.port}/slow",
                                            headers={"Host": LATTICE_HOST, "x-sim-delay-ms": "1000"}))
        await asyncio.sleep(0.4)
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r:
            during = await r.text()
        resp, _ = await slow
        async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r:
            after = await r.text()
    assert resp.status == 200
    assert "sigv4proxy_requests_inflight 1.0" in during
    assert "sigv4proxy_requests_inflight 0.0" in after
