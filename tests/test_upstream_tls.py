"""TLS upstreams (trustme CA on loopback): h2 via ALPN, fallback to HTTP/1.1, SNI, verification,
handshake timeouts; and the same paths under uvloop, which production runs on."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
import uvloop
from support.h2_peers import H2Script, H2TestServer
from support.upstream_servers import H1TestServer, SilentServer, make_pki

from sigv4proxy.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.http2 import H2Connection
from sigv4proxy.upstream.lean_h2 import LeanH2Connection
from sigv4proxy.upstream.pool import ConnectionPool
from sigv4proxy.upstream.tls import make_client_ssl_context

H2_IMPLEMENTATIONS = [H2Connection, LeanH2Connection]


@pytest.fixture(params=H2_IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def h2_impl(request):
    return request.param


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


def tls_origin(port: int, protocol: str = "auto", name: str = "upstream.test") -> Origin:
    return Origin("https", "127.0.0.1", port, protocol=protocol, server_hostname=name)


class ServerNameRecorder:
    """Wraps a server context to record the SNI each handshake carried."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.names: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: self.names.append(name)


async def test_h2_over_tls_with_alpn_and_sni(pki, h2_impl):
    server_context = pki.server_context(["h2", "http/1.1"])
    sni = ServerNameRecorder(server_context)
    pool = ConnectionPool(ssl_context=make_client_ssl_context(pki.ca_file),
                          h2_connection_factory=h2_impl)
    try:
        async with H2TestServer(ssl_context=server_context) as server:
            response = await pool.request(tls_origin(server.port), b"GET", b"/x?y=1",
                                          b"upstream.test", [(b"x-a", b"1")])
            echo = json.loads(await response.read())
    finally:
        await pool.aclose()
    assert response.http_version == "HTTP/2"
    assert echo["scheme"] == "https" and echo["path"] == "/x?y=1"
    assert sni.names == ["upstream.test"]


async def test_alpn_http11_falls_back_to_http1_over_the_same_tls(pki, h2_impl):
    server_context = pki.server_context(["http/1.1"])
    async with H1TestServer() as h1:
        pool = ConnectionPool(ssl_context=make_client_ssl_context(pki.ca_file),
                              h2_connection_factory=h2_impl)
        try:
            async with H2TestServer(ssl_context=server_context) as server:
                server.http1_handler = h1.serve
                for _ in range(3):
                    response = await pool.request(tls_origin(server.port), b"POST", b"/p",
                                                  b"upstream.test", [], b"abc")
                    echo = json.loads(await response.read())
                    assert response.http_version == "HTTP/1.1"
                    assert echo["headers"][0] == ["Host", "upstream.test"]
        finally:
            await pool.aclose()
    assert h1.stats.connections == 1  # kept alive over TLS
    assert server.stats.connections == 0  # no h2 connection was ever made


async def test_verification_is_on_by_default(pki):
    # With no context given the pool builds one per ALPN offer; here it trusts the system store,
    # so the trustme certificate must be rejected: verification is on by default.
    async with H2TestServer(ssl_context=pki.server_context(["h2"])) as server:
        pool = ConnectionPool()
        try:
            with pytest.raises(UpstreamConnectError) as caught:
                await pool.request(tls_origin(server.port), b"GET", b"/", b"h", [])
        finally:
            await pool.aclose()
    assert "verification" in caught.value.reason


async def test_wrong_certificate_name_is_rejected(pki):
    async with H2TestServer(ssl_context=pki.server_context(["h2"])) as server:
        pool = ConnectionPool(ssl_context=make_client_ssl_context(pki.ca_file))
        try:
            with pytest.raises(UpstreamConnectError):
                await pool.request(tls_origin(server.port, name="other.test"), b"GET", b"/",
                                   b"h", [])
        finally:
            await pool.aclose()


async def test_verify_false_accepts_an_untrusted_certificate(pki):
    async with H2TestServer(ssl_context=pki.server_context(["h2"])) as server:
        pool = ConnectionPool(ssl_context=make_client_ssl_context(verify=False))
        try:
            response = await pool.request(tls_origin(server.port, name="other.test"), b"GET",
                                          b"/", b"h", [])
            assert response.status == 200
            await response.read()
        finally:
            await pool.aclose()


async def test_h2_origin_refuses_an_http11_only_peer(pki):
    async with H2TestServer(ssl_context=pki.server_context(["http/1.1"])) as server:
        pool = ConnectionPool(ssl_context=make_client_ssl_context(pki.ca_file))
        try:
            # the given context offers h2 and http/1.1; the peer picks http/1.1
            with pytest.raises(UpstreamProtocolError) as caught:
                await pool.request(tls_origin(server.port, protocol="h2"), b"GET", b"/", b"h", [])
        finally:
            await pool.aclose()
    assert caught.value.status == 502


async def test_tls_handshake_that_hangs_times_out(pki):
    async with SilentServer() as server:
        pool = ConnectionPool(ssl_context=make_client_ssl_context(pki.ca_file),
                              timeouts=Timeouts(connect=0.3))
        try:
            with pytest.raises(UpstreamTimeout) as caught:
                await pool.request(tls_origin(server.port), b"GET", b"/", b"h", [])
        finally:
            await pool.aclose()
    assert caught.value.status == 504 and server.connections == 1


def test_tls_h2_fallback_and_goaway_under_uvloop(tmp_path):
    """The transport hand-over (set_protocol after ALPN) and h2 paths on uvloop's transports."""
    pki = make_pki(tmp_path)

    async def scenario() -> tuple[str, str, int]:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        client = make_client_ssl_context(pki.ca_file)
        pool = ConnectionPool(ssl_context=client)
        try:
            async with H2TestServer(H2Script(goaway_after=2),
                                    ssl_context=pki.server_context(["h2"])) as h2_server:
                results = await asyncio.gather(*(
                    pool.request(tls_origin(h2_server.port), b"POST", f"/delay/50?{i}".encode(),
                                 b"upstream.test", [], b"x" * 100_000) for i in range(4)))
                bodies = [json.loads(await r.read()) for r in results]
                assert [b["body_length"] for b in bodies] == [100_000] * 4
                h2_version = results[0].http_version
                h2_connections = h2_server.stats.connections
            async with H1TestServer() as h1, H2TestServer(
                    ssl_context=pki.server_context(["http/1.1"])) as fallback:
                fallback.http1_handler = h1.serve
                response = await pool.request(tls_origin(fallback.port), b"GET", b"/", b"h", [])
                await response.read()
                h1_version = response.http_version
        finally:
            await pool.aclose()
        return h2_version, h1_version, h2_connections

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        h2_version, h1_version, h2_connections = runner.run(asyncio.wait_for(scenario(), 30))
    assert (h2_version, h1_version) == ("HTTP/2", "HTTP/1.1")
    assert h2_connections == 2  # GOAWAY after two streams: the rest were retried elsewhere


async def test_context_factory_offers_http11_only_to_http1_origins(pki):
    server_context = pki.server_context(["h2", "http/1.1"])  # prefers h2 when offered
    offers: list[tuple[str, ...]] = []

    def factory(alpn: tuple[str, ...]) -> ssl.SSLContext:
        offers.append(alpn)
        return make_client_ssl_context(pki.ca_file, alpn=alpn)

    async with H1TestServer() as h1:
        pool = ConnectionPool(ssl_context_factory=factory)
        try:
            async with H2TestServer(ssl_context=server_context) as server:
                server.http1_handler = h1.serve
                one = await pool.request(tls_origin(server.port, "http1"), b"GET", b"/", b"h", [])
                await one.read()
                two = await pool.request(tls_origin(server.port), b"GET", b"/", b"h", [])
                await two.read()
        finally:
            await pool.aclose()
    assert (one.http_version, two.http_version) == ("HTTP/1.1", "HTTP/2")
    assert offers == [("http/1.1",), ("h2", "http/1.1")]
