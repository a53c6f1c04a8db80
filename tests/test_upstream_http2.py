"""HTTP/2 upstream client over real loopback sockets, against the scriptable `h2` test server.

Every test is parametrized over the HTTP/2 connection implementation (`h2_impl`), so a second
(lean) implementation can be added to `H2_IMPLEMENTATIONS` and must pass the same tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from support.h2_peers import H2Script, H2TestServer, pattern_bytes, pattern_sha256
from support.upstream_servers import SilentServer, dead_port

from sigv4proxy.errors import (
    BadRequest,
    Overloaded,
    RetryableStreamError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sigv4proxy.model import Origin, PoolLimits, Timeouts
from sigv4proxy.upstream.base import open_transport
from sigv4proxy.upstream.connection_core import ConnState
from sigv4proxy.upstream.http2 import H2Connection
from sigv4proxy.upstream.lean_h2 import LeanH2Connection
from sigv4proxy.upstream.pool import ConnectionPool

H2_IMPLEMENTATIONS = [H2Connection, LeanH2Connection]
MiB = 1 << 20


@pytest.fixture(params=H2_IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def h2_impl(request):
    return request.param


@pytest.fixture
async def make_pool(h2_impl):
    pools: list[ConnectionPool] = []

    def make(**kwargs) -> ConnectionPool:
        pool = ConnectionPool(h2_connection_factory=h2_impl, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()


def h2c(server: H2TestServer) -> Origin:
    return Origin("http", "127.0.0.1", server.port, protocol="h2")


async def wait_until(predicate, timeout: float = 5.0) -> None:
    """Polls `predicate` every 10 ms; fails the test if it is still false after `timeout`."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def settle(read_value, rounds: int = 5, interval: float = 0.05, timeout: float = 5.0):
    """Waits until `read_value()` stops changing for `rounds` polls; returns it."""
    last, same = read_value(), 0
    for _ in range(int(timeout / interval)):
        await asyncio.sleep(interval)
        value = read_value()
        same = same + 1 if value == last else 0
        last = value
        if same >= rounds:
            return value
    raise AssertionError("value kept changing")


async def test_headers_target_and_pseudo_headers_arrive_exactly(make_pool):
    headers = [
        (b"x-b", b"2"), (b"x-a", b"1"), (b"x-b", b"3"),  # order and repeats
        (b"cookie", b"a=1"), (b"cookie", b"b=2"),  # not joined, not split
        (b"x-amz-date", b"20240101T000000Z"), (b"x-spaces", b"a  b\tc"),
        (b"x-obs-text", b"caf\xc3\xa9 \xff"), (b"content-type", b"text/plain; charset=utf-8"),
    ]
    target = b"/a%2Fb/%7Ec//d;p?b=2&a=1&a=%2f&empty=&flag&%E2%9C%93=x+y"
    async with H2TestServer() as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"GET", target, b"svc.example:8443", headers)
        echo = json.loads(await response.read())
    assert response.status == 200 and response.http_version == "HTTP/2"
    sent = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in echo["headers"]]
    assert sent[:4] == [(b":method", b"GET"), (b":scheme", b"http"),
                        (b":authority", b"svc.example:8443"), (b":path", target)]
    assert sent[4:] == headers  # nothing stripped, nothing added, nothing reordered


async def test_uppercase_header_names_are_lowercased_for_http2(make_pool):
    # RFC 9113 8.2.1: uppercase names are malformed in HTTP/2; values stay untouched.
    async with H2TestServer() as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"GET", b"/", b"h",
                                      [(b"X-Mixed-Case", b"Value With CAPS")])
        echo = json.loads(await response.read())
    assert echo["headers"][4:] == [["x-mixed-case", "Value With CAPS"]]


@pytest.mark.parametrize("status", [b"999", b"600", b"099", b"000", b"2000"])
async def test_a_status_outside_100_to_599_is_a_protocol_error_on_that_stream(make_pool, status):
    # RFC 9110 §15: invalid; a client treats it as a server error, so the proxy answers 502.
    async with H2TestServer() as server:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError) as caught:
            response = await pool.request(h2c(server), b"GET", b"/status/" + status, b"h", [])
            await response.read()
        assert caught.value.status == 502
        response = await pool.request(h2c(server), b"GET", b"/status/599", b"h", [])
        assert response.status == 599 and await response.read() == b""


class _RefusingH2Server:
    """Answers every connection's preface with `frames` (SETTINGS first, then e.g. GOAWAY) and
    counts the connections."""

    def __init__(self, frames: bytes) -> None:
        self.frames = frames
        self.connections = 0

    async def __aenter__(self) -> "_RefusingH2Server":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if await reader.read(65536):
                writer.write(self.frames)
                while await reader.read(65536):
                    pass
        except ConnectionError:
            pass
        finally:
            writer.close()


def _frame(kind: int, flags: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + b"\0\0\0\0" + payload


@pytest.mark.parametrize("refusal", [
    _frame(7, 0, bytes(8)),  # GOAWAY(last stream 0, NO_ERROR) straight after setup
    _frame(4, 0, (3).to_bytes(2, "big") + (0).to_bytes(4, "big")),  # MAX_CONCURRENT_STREAMS = 0
], ids=["goaway", "no-streams"])
async def test_an_upstream_refusing_every_new_connection_fails_fast(make_pool, refusal):
    # Each new connection could take no request: a few are tried, then a typed 502, never a
    # spin through --max-connections sockets until the pool timeout.
    frames = _frame(4, 0, b"") + _frame(4, 1, b"") + refusal
    async with _RefusingH2Server(frames) as server:
        pool = make_pool()
        with pytest.raises(UpstreamConnectError) as caught:
            await asyncio.wait_for(pool.request(h2c(server), b"GET", b"/", b"h", []), 5)
    assert caught.value.status == 502 and "take no requests" in caught.value.reason
    assert server.connections <= 3


async def test_response_headers_and_trailers(make_pool):
    async with H2TestServer() as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"GET", b"/trailers", b"h", [])
        body = await response.read()
    assert body == b"body-before-trailers"
    assert response.trailers == [(b"x-checksum", b"abc123"), (b"x-done", b"1")]
    assert all(not name.startswith(b":") for name, _ in response.headers)


async def test_bytes_body_roundtrip(make_pool):
    payload = pattern_bytes(300_000)
    async with H2TestServer() as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"PUT", b"/up", b"h",
                                      [(b"content-length", b"300000")], payload)
        echo = json.loads(await response.read())
    assert echo["method"] == "PUT"
    assert echo["body_length"] == 300_000
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_32_mib_streamed_both_ways(make_pool):
    size = 32 * MiB

    async def upload():
        for offset in range(0, size, 256 * 1024):
            yield pattern_bytes(256 * 1024, offset)

    async with H2TestServer() as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"POST", b"/up", b"h", [], upload())
        echo = json.loads(await response.read())
        assert echo["body_length"] == size
        assert echo["body_sha256"] == pattern_sha256(size)

        response = await pool.request(h2c(server), b"GET", f"/stream/{size}".encode(), b"h", [])
        digest, received = hashlib.sha256(), 0
        async for chunk in response:
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


async def test_slow_reader_slows_the_upstream(make_pool):
    """Download backpressure: unread response bytes stay bounded by the receive window."""
    size = 32 * MiB
    async with H2TestServer() as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"GET", f"/stream/{size}".encode(), b"h", [])
        first = await response.__aiter__().__anext__()
        sent = await settle(lambda: server.stats.response_bytes_sent)
        assert sent <= 2 * MiB, f"server pushed {sent} bytes into a reader that stopped"
        digest = hashlib.sha256(first)
        async for chunk in response:
            digest.update(chunk)
    assert digest.hexdigest() == pattern_sha256(size)


async def test_slow_upstream_reader_slows_the_body_source(make_pool):
    """Upload backpressure: the body iterable is pulled only as the peer's window allows."""
    size, chunk = 16 * MiB, 64 * 1024
    pulled = 0

    async def upload():
        nonlocal pulled
        for offset in range(0, size, chunk):
            pulled += chunk
            yield pattern_bytes(chunk, offset)

    async with H2TestServer(H2Script(hold_request_window=True)) as server:
        pool = make_pool()
        task = asyncio.create_task(pool.request(h2c(server), b"POST", b"/up", b"h", [], upload()))
        received = await settle(lambda: server.stats.request_bytes_received)
        assert pulled < size
        # in flight between us and the peer: at most a chunk plus the transport's write buffer
        assert pulled - received <= 2 * MiB, (pulled, received)
        server.release_request_window()
        response = await asyncio.wait_for(task, 30)
        echo = json.loads(await response.read())
    assert echo["body_length"] == size and echo["body_sha256"] == pattern_sha256(size)


async def test_200_concurrent_requests_share_few_connections(make_pool):
    async with H2TestServer() as server:  # the h2 server allows 100 concurrent streams
        pool = make_pool(limits=PoolLimits(max_connections_per_origin=8))

        async def one(i: int) -> dict:
            response = await pool.request(h2c(server), b"GET", f"/delay/50?i={i}".encode(), b"h", [])
            return json.loads(await response.read())

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 30)
    assert sorted(r["path"] for r in results) == sorted(f"/delay/50?i={i}" for i in range(200))
    assert 1 <= server.stats.connections <= 3
    assert server.stats.peak_active > 50  # really multiplexed
    assert server.stats.refused == 0


async def test_max_concurrent_streams_is_honoured(make_pool):
    async with H2TestServer(H2Script(max_concurrent_streams=1)) as server:
        pool = make_pool(limits=PoolLimits(max_connections_per_origin=2))

        async def one(i: int) -> int:
            response = await pool.request(h2c(server), b"GET", f"/delay/20?i={i}".encode(), b"h", [])
            await response.read()
            return response.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), 30)
    assert statuses == [200] * 12
    assert server.stats.connections == 2  # opened a second one when the first was full
    assert server.stats.peak_active <= 2  # never more than one stream per connection
    assert server.stats.refused == 0


async def test_requests_wait_fairly_and_bounded_when_full(make_pool):
    async with H2TestServer(H2Script(max_concurrent_streams=1)) as server:
        pool = make_pool(limits=PoolLimits(max_connections_per_origin=1))
        order: list[int] = []

        async def one(i: int) -> None:
            response = await pool.request(h2c(server), b"GET", f"/delay/30?i={i}".encode(), b"h", [])
            await response.read()
            order.append(i)

        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.005)  # queue them in a known order
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert order == list(range(6))  # FIFO

        slow = make_pool(limits=PoolLimits(max_connections_per_origin=1),
                         timeouts=Timeouts(pool=0.2))
        # a response bigger than the receive window, unread: its stream stays open
        blocker = await slow.request(h2c(server), b"GET", f"/stream/{4 * MiB}".encode(), b"h", [])
        try:
            with pytest.raises(Overloaded) as caught:
                await slow.request(h2c(server), b"GET", b"/", b"h", [])
            assert caught.value.status == 503
            assert slow.stats().requests_waiting == 0
        finally:
            await blocker.aclose()


async def test_refused_streams_are_retried(make_pool):
    async with H2TestServer(H2Script(refuse_first=2)) as server:
        pool = make_pool(limits=PoolLimits(max_retries=2))
        response = await pool.request(h2c(server), b"POST", b"/r", b"h", [], b"payload")
        echo = json.loads(await response.read())
    assert echo["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert server.stats.refused == 2 and server.stats.streams == 3


async def test_refused_stream_surfaces_when_retries_run_out(make_pool):
    async with H2TestServer(H2Script(refuse_first=3)) as server:
        pool = make_pool(limits=PoolLimits(max_retries=2))
        with pytest.raises(RetryableStreamError) as caught:
            await pool.request(h2c(server), b"GET", b"/", b"h", [])
    assert caught.value.status == 502
    assert server.stats.refused == 3


async def test_refused_streamed_body_is_not_retried_once_pulled(make_pool):
    pulls = 0

    async def upload():
        nonlocal pulls
        pulls += 1
        yield b"first"
        await asyncio.sleep(0.2)  # the refusal arrives while we are still uploading
        yield b"second"

    async with H2TestServer(H2Script(refuse_first=1)) as server:
        pool = make_pool()
        with pytest.raises(RetryableStreamError):
            await pool.request(h2c(server), b"POST", b"/", b"h", [], upload())
    assert pulls == 1 and server.stats.streams == 1


async def test_goaway_mid_flight_finishes_old_streams_and_retries_the_rest(make_pool):
    async with H2TestServer(H2Script(goaway_after=3)) as server:
        pool = make_pool()

        async def one(i: int) -> dict:
            response = await pool.request(h2c(server), b"POST", f"/delay/100?i={i}".encode(),
                                          b"h", [], f"body-{i}".encode())
            return json.loads(await response.read())

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(6))), 30)
        for i, echo in enumerate(results):
            assert echo["path"] == f"/delay/100?i={i}"
            assert echo["body_sha256"] == hashlib.sha256(f"body-{i}".encode()).hexdigest()
        assert server.stats.connections == 2
        assert len(server.stats.requests) == 6  # each processed exactly once
        # the connection that got GOAWAY closes once its streams are done
        await wait_until(lambda: sum(pool.stats().connections.values()) == 1)


async def test_zero_initial_window_then_opened(make_pool):
    payload = pattern_bytes(300_000)
    async with H2TestServer(H2Script(initial_window_size=0, open_window_after=0.2)) as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"POST", b"/", b"h", [], payload)
        echo = json.loads(await response.read())
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_stalled_upstream_gives_first_byte_timeout(make_pool):
    async with H2TestServer(H2Script(stall=True)) as server:
        pool = make_pool(timeouts=Timeouts(first_byte=0.3))
        with pytest.raises(UpstreamTimeout) as caught:
            await pool.request(h2c(server), b"GET", b"/", b"h", [])
    assert caught.value.status == 504
    assert pool.stats().streams_active == 0  # the stream was cancelled, not leaked


async def test_first_byte_deadline_is_each_stream_own(make_pool):
    """One lazy timer per connection bounds every stream's wait for its head: a stream sent
    later must time out at its own deadline (not an earlier stream's, not never), and a stream
    answered in time on the same connection must not be cut."""
    async with H2TestServer(H2Script()) as server:
        pool = make_pool(timeouts=Timeouts(first_byte=0.5))
        loop = asyncio.get_running_loop()

        async def timed(delay: float, path: bytes) -> tuple[str, float]:
            await asyncio.sleep(delay)
            started = loop.time()
            try:
                response = await pool.request(h2c(server), b"GET", path, b"h", [])
                await response.read()
                return "answered", loop.time() - started
            except UpstreamTimeout:
                return "timed out", loop.time() - started

        first, quick, later = await asyncio.wait_for(asyncio.gather(
            timed(0.0, b"/delay/3000"), timed(0.1, b"/delay/100"), timed(0.3, b"/delay/3000")), 10)
    assert quick[0] == "answered"
    for outcome, waited in (first, later):
        assert outcome == "timed out" and 0.45 <= waited < 0.9, (first, later)
    assert server.stats.connections == 1


async def test_body_stall_makes_the_iterator_raise_timeout(make_pool):
    async with H2TestServer(H2Script(stall_mid_response=True)) as server:
        pool = make_pool(timeouts=Timeouts(read=0.3))
        response = await pool.request(h2c(server), b"GET", b"/stream/200000", b"h", [])
        received = 0
        with pytest.raises(UpstreamTimeout):
            async for chunk in response:
                received += len(chunk)
    assert 0 < received < 200000


async def test_connection_closed_mid_response_makes_the_iterator_raise(make_pool):
    async with H2TestServer(H2Script(close_mid_response=True)) as server:
        pool = make_pool()
        response = await pool.request(h2c(server), b"GET", b"/stream/2000000", b"h", [])
        received = 0
        with pytest.raises(UpstreamReset):
            async for chunk in response:
                received += len(chunk)
    assert received < 2000000
    assert pool.stats().streams_active == 0


async def test_dead_port_is_a_connect_error(make_pool):
    pool = make_pool()
    with pytest.raises(UpstreamConnectError) as caught:
        await pool.request(Origin("http", "127.0.0.1", dead_port(), "h2"), b"GET", b"/", b"h", [])
    assert caught.value.status == 502


async def test_peer_that_never_sends_settings_times_out_on_connect(make_pool):
    async with SilentServer() as server:
        pool = make_pool(timeouts=Timeouts(connect=0.3))
        with pytest.raises(UpstreamTimeout):
            await pool.request(Origin("http", "127.0.0.1", server.port, "h2"), b"GET", b"/", b"h", [])
    assert sum(pool.stats().connections.values()) == 0


async def test_closing_a_response_early_cancels_only_that_stream(make_pool):
    async with H2TestServer() as server:
        pool = make_pool()
        big = await pool.request(h2c(server), b"GET", f"/stream/{8 * MiB}".encode(), b"h", [])
        await big.__aiter__().__anext__()
        assert pool.stats().streams_active == 1
        await big.aclose()
        await wait_until(lambda: server.stats.active == 0)  # the server saw RST_STREAM
        response = await pool.request(h2c(server), b"GET", b"/after", b"h", [])
        assert json.loads(await response.read())["path"] == "/after"
    assert server.stats.connections == 1  # same connection, still healthy


async def test_idle_connections_are_closed(make_pool):
    async with H2TestServer() as server:
        pool = make_pool(timeouts=Timeouts(idle=0.2))
        response = await pool.request(h2c(server), b"GET", b"/", b"h", [])
        await response.read()
        assert pool.stats().connections[("h2", "idle")] == 1
        await wait_until(lambda: sum(pool.stats().connections.values()) == 0)
        response = await pool.request(h2c(server), b"GET", b"/", b"h", [])
        await response.read()
    assert server.stats.connections == 2


async def test_a_connection_in_steady_use_outlives_the_idle_timeout(make_pool):
    """The idle timer is lazy: one armed at the first idle moment must not close a connection
    that was busy since; only idleness as long as the timeout does."""
    async with H2TestServer() as server:
        pool = make_pool(timeouts=Timeouts(idle=0.3))
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:  # bounded: about ten requests in a second
            response = await pool.request(h2c(server), b"GET", b"/", b"h", [])
            await response.read()
            await asyncio.sleep(0.1)
        assert server.stats.connections == 1
        await wait_until(lambda: sum(pool.stats().connections.values()) == 0)


async def test_stats_count_active_streams(make_pool):
    async with H2TestServer() as server:
        pool = make_pool()
        # bigger than the receive window: the streams stay open until we read
        responses = [await pool.request(h2c(server), b"GET", f"/stream/{4 * MiB}".encode(),
                                        b"h", []) for _ in range(3)]
        await settle(lambda: server.stats.response_bytes_sent)
        stats = pool.stats()
        assert stats.connections[("h2", "active")] == 1
        assert stats.streams_active == 3
        for response in responses:
            assert len(await response.read()) == 4 * MiB
        assert pool.stats().streams_active == 0
        assert pool.stats().connections[("h2", "idle")] == 1


async def open_reporting(h2_impl, origin: Origin, timeouts: Timeouts = Timeouts()):
    """A connection opened as the pool opens one, and the states it reported, without repeats."""
    reported: list[ConnState] = []

    def on_change(conn) -> None:
        if not reported or reported[-1] is not conn.state:
            reported.append(conn.state)

    conn = h2_impl(origin, timeouts, on_change)
    (await open_transport(origin, None, 5)).attach(conn)
    return conn, reported


async def test_a_connection_goes_from_opening_to_ready_to_going_away_to_closed(h2_impl):
    async with H2TestServer(H2Script(goaway_after=1)) as server:
        conn, reported = await open_reporting(h2_impl, h2c(server))
        assert conn.state is ConnState.OPENING and not conn.is_available()  # SETTINGS pending
        await conn.wait_ready(5)
        assert conn.state is ConnState.READY and conn.is_available()
        response = await conn.handle_request(b"GET", b"/", b"h", [], None)
        assert response.status == 200 and await response.read()
        # the GOAWAY kept our one stream; once it ended, the connection closes
        await wait_until(lambda: conn.is_closed())
    assert conn.state is ConnState.CLOSED and not conn.is_available()
    assert reported[-3:] == [ConnState.READY, ConnState.GOING_AWAY, ConnState.CLOSED]
    assert set(reported[:-3]) <= {ConnState.OPENING}


async def test_a_connection_past_its_age_is_retiring_until_its_stream_ends_then_closed(h2_impl):
    async with H2TestServer() as server:
        conn, reported = await open_reporting(h2_impl, h2c(server), Timeouts(max_age=0.3))
        await conn.wait_ready(5)
        request = asyncio.ensure_future(conn.handle_request(b"GET", b"/delay/800", b"h", [], None))
        await wait_until(lambda: conn.state is ConnState.RETIRING)
        assert not conn.is_available() and conn.active_streams() == 1
        response = await asyncio.wait_for(request, 5)
        assert response.status == 200 and json.loads(await response.read())["path"] == "/delay/800"
        await wait_until(lambda: conn.is_closed())  # by us, once its stream ended
    assert reported[-3:] == [ConnState.READY, ConnState.RETIRING, ConnState.CLOSED]
    assert server.stats.streams == 1


@pytest.mark.parametrize("target,headers", [
    (b"/a\r\nx-injected: 1", []),
    (b"/", [(b"x-a", b"v\r\nx-injected: 1")]),
    (b"/", [(b"x-a", b"v\x00")]),
    (b"/", [(b"x-a\n", b"v")]),
    (b"/", [(b":path", b"/other")]),
])
async def test_injection_bytes_are_refused_before_sending(make_pool, target, headers):
    # an h2 upstream that downgrades to HTTP/1.1 must never see CR/LF smuggled in a field
    async with H2TestServer() as server:
        pool = make_pool()
        with pytest.raises(BadRequest) as caught:
            await pool.request(h2c(server), b"GET", target, b"h", headers)
        assert caught.value.status == 400 and "injected" not in caught.value.reason
    assert server.stats.streams == 0
