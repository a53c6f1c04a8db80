"""Inbound HTTP/2 (h2c, prior knowledge) on the proxy port, over real loopback sockets: the same
port still speaks HTTP/1.1; the simulator re-verifies SigV4; scripted h2 upstreams show flow
control, cancellation both ways, idle timeout, errors and graceful shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest
from hpack import NeverIndexedHeaderTuple

from grpc_support.h2client import H2TestClient
from sigv4proxy.runtime.app import ProxyApp
from sigv4proxy.observe.metrics import Metrics
from support.h2_peers import H2Script, H2TestServer
from support.polling import eventually
from support.proxy import (LATTICE_HOST, PRINCIPAL, h2_server_class, proxy_config, running_proxy,
                           static_credentials, watch_upstream)
from support.wire_spy import RecordingTransport, frames_in


def via(port: int, protocol: str = "h2", **extra) -> dict:
    return dict(upstream=f"http://127.0.0.1:{port}", upstream_protocol=protocol, **extra)


@pytest.mark.parametrize("upstream_protocol", ["h2", "http1"])
async def test_h2c_and_http1_share_the_port_and_both_verify(sim, upstream_protocol):
    async with running_proxy(**via(sim.port, upstream_protocol)) as proxy:
        async with H2TestClient("127.0.0.1", proxy.port) as client:
            sid = client.request("GET", "/h2?b=2&a=1", LATTICE_HOST, [
                ("te", "trailers"), ("authorization", "AWS4-HMAC-SHA256 Credential=AKIDFORGED/x"),
                ("x-amz-date", "19990101T000000Z"), ("x-multi", "one"), ("x-multi", "two")])
            record = await client.wait(sid)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"GET /h1 HTTP/1.1\r\nHost: {LATTICE_HOST}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert record.status == 200 and record.ended, record
    echo = json.loads(bytes(record.body))
    assert echo["principal"] == PRINCIPAL and echo["authority"] == LATTICE_HOST
    assert echo["path"] == "/h2" and echo["query"] == "b=2&a=1"
    received = [(n.lower(), v) for n, v in echo["headers"]]
    assert [v for n, v in received if n == "x-multi"] == ["one", "two"]
    assert len([v for n, v in received if n == "x-amz-date"]) == 1
    assert ("x-amz-date", "19990101T000000Z") not in received
    if upstream_protocol == "h2":
        assert ("te", "trailers") in received  # kept on an HTTP/2 hop
    assert "te" not in echo["signed_headers"]
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]


async def test_big_bodies_stream_both_ways_over_h2c(sim):
    size = 8 * 1024 * 1024
    payload = os.urandom(size)
    async with running_proxy(**via(sim.port)) as proxy, H2TestClient("127.0.0.1", proxy.port) as client:
        up = client.request("POST", "/upload", LATTICE_HOST, [("content-length", str(size))], end_stream=False)
        await client.send_data(up, payload, end_stream=True, timeout=30)
        upload = await client.wait(up, 30)
        down = client.request("GET", "/download", LATTICE_HOST, [("x-sim-response-bytes", str(size))])
        download = await client.wait(down, 30)
    echo = json.loads(bytes(upload.body))
    assert upload.status == 200 and echo["body_length"] == size
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert download.status == 200 and download.ended and len(download.body) == size
    assert hashlib.sha256(download.body).hexdigest() == download.header(b"x-sim-body-sha256").decode()


async def test_request_credit_returns_only_as_the_upstream_accepts():
    # The upstream never acknowledges request bytes: the proxy must stop acknowledging too, so the
    # client's window closes after about one stream window, instead of the proxy buffering 8 MiB.
    async with H2TestServer(H2Script(hold_request_window=True)) as upstream, \
            running_proxy(**via(upstream.port), read_timeout=30) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("POST", "/hold", LATTICE_HOST, end_stream=False)
        with pytest.raises(TimeoutError):
            await client.send_data(sid, b"x" * (8 * 1024 * 1024), timeout=1.5)
        assert client.h2.local_flow_control_window(sid) == 0  # the client is held back
        sent = client.sent[sid]
        # At most the proxy's stream window plus what the upstream's 64 KiB window took (and one
        # frame in hand), never the whole 8 MiB.
        from sigv4proxy.inbound.h2server import STREAM_WINDOW

        assert STREAM_WINDOW <= sent <= STREAM_WINDOW + 65535 + 16384, sent
        assert upstream.stats.request_bytes_received <= 65535
        client.reset(sid)


async def test_client_reset_cancels_the_upstream_stream():
    async with H2TestServer(H2Script(stall=True)) as upstream, \
            running_proxy(**via(upstream.port)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("GET", "/stall", LATTICE_HOST)
        assert await eventually(lambda: upstream.stats.active == 1)
        client.reset(sid)
        assert await eventually(lambda: upstream.stats.active == 0)  # upstream saw RST_STREAM
        assert await eventually(lambda: proxy.exchange.inflight == 0)
        # the connection stays usable
        sid2 = client.request("GET", "/again", LATTICE_HOST)
        assert await eventually(lambda: upstream.stats.active == 1)
        client.reset(sid2)


async def test_upstream_cut_mid_body_resets_the_client_stream():
    async with H2TestServer(H2Script(close_mid_response=True)) as upstream, \
            running_proxy(**via(upstream.port)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("GET", "/stream/1000000", LATTICE_HOST)
        record = await client.wait(sid)
    assert record.status == 200
    assert record.reset_code is not None and not record.ended  # never looks complete
    assert len(record.body) < 1000000


async def test_response_trailers_pass_through():
    async with H2TestServer() as upstream, running_proxy(**via(upstream.port)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        record = await client.wait(client.request("GET", "/trailers", LATTICE_HOST))
    assert record.status == 200 and bytes(record.body) == b"body-before-trailers"
    assert record.trailers == [(b"x-checksum", b"abc123"), (b"x-done", b"1")]


@pytest.mark.parametrize("impl", ["lean", "h2"])
async def test_never_indexed_fields_stay_never_indexed_on_the_way_to_the_client(impl):
    # RFC 7541 §7.1.3: an intermediary must not re-encode a never-indexed field (a cookie, a token)
    # in a form that lets it into a compression table.
    async with H2TestServer() as upstream, running_proxy(**via(upstream.port, h2_implementation=impl)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        record = await client.wait(client.request("GET", "/sensitive", LATTICE_HOST))
    assert record.status == 200 and bytes(record.body) == b"ok"
    head = {name: field for field in record.headers for name in [field[0]]}
    assert isinstance(head[b"set-cookie"], NeverIndexedHeaderTuple) and head[b"set-cookie"][1] == b"s=secret"
    assert not isinstance(head[b"x-plain"], NeverIndexedHeaderTuple)
    tail = {field[0]: field for field in record.trailers}
    assert isinstance(tail[b"x-token"], NeverIndexedHeaderTuple) and tail[b"x-token"][1] == b"t"
    assert not isinstance(tail[b"x-done"], NeverIndexedHeaderTuple)


async def test_typed_errors_answer_with_status_header_and_body(sim):
    async with running_proxy(**via(sim.port), max_body_size=1000) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        refused = await client.wait(client.request("GET", "/x", "example.com"))
        too_big = client.request("POST", "/x", LATTICE_HOST, [("content-length", "5000")], end_stream=False)
        too_big_record = await client.wait(too_big)
        connect = await client.wait(client.request("GET", "/still-fine", LATTICE_HOST))
    assert refused.status == 403 and refused.header(b"x-sigv4proxy-error") == b"host_not_allowed"
    assert refused.header(b"server") == b"sigv4proxy"
    assert bytes(refused.body).startswith(b"sigv4proxy: ") and not refused.head_end_stream
    assert too_big_record.status == 413
    assert too_big_record.header(b"x-sigv4proxy-error") == b"payload_too_large"
    assert connect.status == 200
    assert len(sim.records) == 1


async def test_stream_idle_timeout_cuts_a_silent_stream_but_only_that():
    async with H2TestServer(H2Script(stall=True)) as upstream, \
            running_proxy(**via(upstream.port), stream_idle_timeout=0.5) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        # headers sent, body never: no bytes either way
        sid = client.request("POST", "/silent", LATTICE_HOST, end_stream=False)
        record = await client.wait(sid, timeout=10)
        assert record.status == 504
        assert record.header(b"x-sigv4proxy-error") == b"upstream_timeout"
        assert await eventually(lambda: upstream.stats.active == 0)  # upstream stream cancelled


async def test_graceful_stop_sends_goaway_and_finishes_in_flight_streams():
    async with H2TestServer() as upstream:
        app = ProxyApp(proxy_config(**via(upstream.port)), credentials=static_credentials(),
                       metrics=Metrics())
        await app.start()
        try:
            async with H2TestClient("127.0.0.1", app.port) as client:
                sid = client.request("GET", "/delay/400", LATTICE_HOST)
                assert await eventually(lambda: app.exchange.inflight == 1)
                stopping = asyncio.get_running_loop().create_task(app.stop(drain_timeout=5))
                record = await client.wait(sid)
                await asyncio.wait_for(stopping, 10)
                assert client.goaway is not None
        finally:
            if not app.pool._closed:
                await app.stop(drain_timeout=1)
    assert record.status == 200 and record.ended
    assert json.loads(bytes(record.body))["path"] == "/delay/400"


async def test_http2_requests_are_access_logged(caplog):
    import json as _json
    import logging

    async with H2TestServer() as upstream, \
            running_proxy(**via(upstream.port), access_log=True) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        with caplog.at_level(logging.INFO, logger="sigv4proxy.access"):
            sid = client.request("GET", "/logged?secret=1", LATTICE_HOST)
            record = await client.wait(sid, timeout=10)
            assert record.status == 200
            sid = client.request("GET", "/x", "not-allowed.example")
            assert (await client.wait(sid, timeout=10)).status == 403
            assert await eventually(lambda: len([r for r in caplog.records if r.name == "sigv4proxy.access"]) == 2)
    ok, denied = [r for r in caplog.records if r.name == "sigv4proxy.access"]
    assert (ok.protocol, ok.requestPath, ok.responseCode, ok.failureReason) == ("HTTP/2", "/logged", 200, "-")
    assert (denied.responseCode, denied.failureReason) == (403, "host_not_allowed")
    assert "secret=1" not in _json.dumps([vars(r) for r in (ok, denied)], default=str)


async def test_downloads_share_the_clients_connection_window_in_turn(sim):
    # A client that opens its connection window a little at a time: every response waiting for it
    # must get a share. Before, each opening woke all of them and the first to run took it all,
    # so one download could hold the others back for as long as it lasted.
    import h2.settings

    size = 200_000
    async with running_proxy(**via(sim.port)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port, auto_ack=False) as client:
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        client.flush()  # stream windows are not the limit here, the connection window is
        headers = [("x-sim-response-bytes", str(size))]
        first = client.request("GET", "/d1", LATTICE_HOST, headers)
        assert await eventually(lambda: len(client.streams[first].body) == 65_535)
        others = []
        for name in ("/d2", "/d3"):
            others.append(client.request("GET", name, LATTICE_HOST, headers))
            await asyncio.wait_for(client.streams[others[-1]].head.wait(), 10)
            await asyncio.sleep(0.1)  # its response now waits for the connection window
        before = {sid: len(client.streams[sid].body) for sid in (first, *others)}
        for _ in range(6):
            total = sum(len(r.body) for r in client.streams.values())
            client.h2.increment_flow_control_window(10_000)
            client.flush()
            assert await eventually(
                lambda: sum(len(r.body) for r in client.streams.values()) == total + 10_000)
        gained = {sid: len(client.streams[sid].body) - before[sid] for sid in before}
        assert sum(gained.values()) == 60_000
        assert all(gained[sid] > 0 for sid in others), gained
        assert gained[first] < 60_000, gained
        client.h2.increment_flow_control_window(3 * size)
        client.flush()
        for sid in (first, *others):
            record = await client.wait(sid, 10)
            assert record.status == 200 and record.ended and len(record.body) == size


async def test_responses_sent_in_one_pass_share_one_write_and_each_arrives_whole():
    # Under load many streams answer in the same loop pass: their frames go out in one write
    # (in the order queued) instead of one write per stream.
    H2ServerConnection = h2_server_class()

    release = asyncio.Event()
    waiting: list[int] = []
    connections: list = []

    async def handler(stream):
        waiting.append(stream.id)
        await release.wait()
        stream.send_headers([(b":status", b"200"), (b"x-stream", str(stream.id).encode())])
        await stream.send_data(b"body-%d" % stream.id, end_stream=True)

    def factory():
        conn = H2ServerConnection(handler)
        connections.append(conn)
        return conn

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with H2TestClient("127.0.0.1", port) as client:
            sids = [client.request("GET", f"/{i}", LATTICE_HOST) for i in range(9)]
            assert await eventually(lambda: len(waiting) == 9)
            conn = connections[0]
            conn.transport = spy = RecordingTransport(conn.transport)
            release.set()
            records = [await client.wait(sid) for sid in sids]
    finally:
        server.close()
        await server.wait_closed()
    for sid, record in zip(sids, records):
        assert record.status == 200 and record.ended
        assert record.header(b"x-stream") == str(sid).encode() and bytes(record.body) == b"body-%d" % sid
    types = [frame_type for frame_type, _ in frames_in(spy.writes[0])]
    assert types.count(0x1) == 9 and types.count(0x0) == 9, types  # HEADERS, DATA


@pytest.mark.parametrize("impl", ["lean", "h2"])
async def test_request_frames_already_buffered_go_upstream_together_and_credit_returns(impl):
    # A client that sends faster than the upstream takes: 64 frames of 4 KiB wait in the proxy;
    # they leave in chunks of up to 64 KiB (one upstream write each), not a write per frame. Every
    # byte's credit must come back: 70 such uploads on one connection pass its 16 MiB window.
    body = os.urandom(64 * 4096)
    digest = hashlib.sha256(body).hexdigest()
    uploads = 70
    async with H2TestServer() as upstream, \
            running_proxy(**via(upstream.port, h2_implementation=impl)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        for _ in range(uploads):
            sid = client.request("POST", "/upload", LATTICE_HOST,
                                 [("content-length", str(len(body)))], end_stream=False)
            assert await eventually(lambda: client.h2.local_flow_control_window(sid) >= len(body))
            for offset in range(0, len(body), 4096):  # all 64 frames in one write
                client.h2.send_data(sid, body[offset:offset + 4096])
            client.h2.end_stream(sid)
            client.flush()
            record = await client.wait(sid)
            assert record.status == 200, record
            echo = json.loads(bytes(record.body))
            assert echo["body_length"] == len(body) and echo["body_sha256"] == digest
    assert upstream.stats.request_data_frames <= uploads * 24, upstream.stats.request_data_frames


@pytest.mark.parametrize("upstream_protocol, impl", [("h2", "lean"), ("h2", "h2"), ("http1", "lean")])
async def test_the_last_response_chunk_carries_end_stream_without_an_empty_frame(
        sim, upstream_protocol, impl):
    import h2.events

    async with running_proxy(**via(sim.port, upstream_protocol, h2_implementation=impl)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        seen, on = [], client._on

        def record(event):
            if isinstance(event, h2.events.DataReceived):
                seen.append((event.stream_id, len(event.data), event.stream_ended is not None))
            on(event)

        client._on = record
        small = client.request("GET", "/small", LATTICE_HOST)
        big = client.request("GET", "/big", LATTICE_HOST, [("x-sim-response-bytes", str(300_000))])
        small_record, big_record = await client.wait(small), await client.wait(big)
    assert small_record.status == 200 and small_record.ended
    assert big_record.status == 200 and big_record.ended and len(big_record.body) == 300_000
    for sid in (small, big):
        frames = [(size, ended) for s, size, ended in seen if s == sid]
        assert all(size > 0 for size, _ in frames), frames  # no empty DATA frame to end it
        assert frames[-1][1] and not any(ended for _, ended in frames[:-1]), frames


async def test_a_small_body_that_arrived_whole_goes_upstream_with_its_head(sim):
    # HEADERS and DATA(END_STREAM) of a 4 KiB upload arrive together: the pool gets the body as
    # bytes (sent inline with the upstream HEADERS, no upload task); one still arriving streams.
    bodies = []

    def seen(origin, method, target, authority, headers, body):
        bodies.append(bytes(body) if isinstance(body, bytes) else type(body).__name__)

    body = os.urandom(4096)
    async with running_proxy(**via(sim.port)) as proxy, H2TestClient("127.0.0.1", proxy.port) as client:
        watch_upstream(proxy, seen)
        whole = client.request("POST", "/whole", LATTICE_HOST, end_stream=False)
        client.h2.send_data(whole, body, end_stream=True)
        client.flush()
        records = [await client.wait(whole)]
        late = client.request("POST", "/late", LATTICE_HOST, end_stream=False)
        client.h2.send_data(late, body[:1000])
        client.flush()
        await asyncio.sleep(0.2)  # the handler is forwarding by now, the body still open
        client.h2.send_data(late, body[1000:], end_stream=True)
        client.flush()
        records.append(await client.wait(late))
    for record in records:
        assert record.status == 200, record
        echo = json.loads(bytes(record.body))
        assert echo["body_length"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert bodies == [body, "_RequestBody"]


async def test_a_whole_small_body_over_the_limit_is_refused(sim):
    async with running_proxy(**via(sim.port), max_body_size=1000) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("POST", "/too-big", LATTICE_HOST, end_stream=False)  # no content-length
        client.h2.send_data(sid, b"x" * 4096, end_stream=True)
        client.flush()
        record = await client.wait(sid)
    assert record.status == 413 and record.header(b"x-sigv4proxy-error") == b"payload_too_large"
    assert len(sim.records) == 0


@pytest.mark.parametrize("upstream_protocol", ["h2", "http1"])
async def test_a_response_whose_body_is_already_here_leaves_with_its_head(sim, monkeypatch,
                                                                          upstream_protocol):
    # The simulator's small answer arrives with its head: the proxy's HEADERS and DATA for it go
    # out in one write instead of two.
    H2ServerConnection = h2_server_class()
    spies: list[RecordingTransport] = []
    connection_made = H2ServerConnection.connection_made

    def recording_connection_made(self, transport):
        spies.append(RecordingTransport(transport))
        connection_made(self, spies[-1])

    monkeypatch.setattr(H2ServerConnection, "connection_made", recording_connection_made)
    async with running_proxy(**via(sim.port, upstream_protocol)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        sid = client.request("GET", "/small", LATTICE_HOST)
        record = await client.wait(sid)
    assert record.status == 200 and record.ended and json.loads(bytes(record.body))["path"] == "/small"

    writes = [each for spy in spies for each in spy.writes]
    with_head = [frames_in(w) for w in writes if (0x1, sid) in frames_in(w)]
    assert len(with_head) == 1 and (0x0, sid) in with_head[0], [frames_in(w) for w in writes]


async def test_a_client_that_half_closes_gets_its_answers_then_the_connection_closes(sim):
    """TCP half-close after the requests: the one that arrived whole is answered (the simulator
    verified it), the one whose body was cut short is reset, and the connection then closes
    rather than waiting for idle timeouts."""
    async with running_proxy(**via(sim.port)) as proxy, H2TestClient("127.0.0.1", proxy.port) as client:
        whole = client.request("GET", "/whole", LATTICE_HOST)
        cut = client.request("POST", "/cut", LATTICE_HOST, [("content-length", "100000")], end_stream=False)
        await client.send_data(cut, b"x" * 1000)
        client.half_close()
        answered, reset = await client.wait(whole), await client.wait(cut)
        await asyncio.wait_for(client.closed.wait(), 5)
    assert answered.status == 200 and answered.ended
    echo = json.loads(bytes(answered.body))
    assert echo["principal"] == PRINCIPAL and echo["path"] == "/whole"
    assert reset.status is None and reset.reset_code == 8  # CANCEL


@pytest.mark.parametrize("leaves", ["after the head", "before the answer"])
@pytest.mark.parametrize("impl", ["lean", "h2"])
async def test_a_client_that_leaves_with_the_window_shut_is_not_waited_for(sim, impl, leaves):
    """The client shut its stream window (SETTINGS_INITIAL_WINDOW_SIZE 0) and half-closed, once
    the answer's head was in or before the answer came: no WINDOW_UPDATE can come any more, so
    the stream that needs the window is reset (CANCEL) at once and its request ends, instead of
    waiting out the idle timeout (found by `make fuzz`: requests left in flight)."""
    from h2.settings import SettingCodes

    async with running_proxy(**via(sim.port, h2_implementation=impl)) as proxy, \
            H2TestClient("127.0.0.1", proxy.port) as client:
        client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sid = client.request("GET", "/shut", LATTICE_HOST)
        record = client.streams[sid]
        if leaves == "after the head":  # the stream waits for the window when the client leaves
            await asyncio.wait_for(record.head.wait(), 10)  # the head went; its body cannot
            await asyncio.sleep(0.1)
            assert proxy.exchange.inflight == 1 and not record.done.is_set()
        client.half_close()
        await client.wait(sid, timeout=5)
        await asyncio.wait_for(client.closed.wait(), 5)
        assert await eventually(lambda: proxy.exchange.inflight == 0, timeout=5)
    assert record.status == 200 and not record.body and record.reset_code == 8  # CANCEL


async def test_a_client_that_half_closes_with_nothing_open_is_closed_at_once(sim):
    async with running_proxy(**via(sim.port)) as proxy, H2TestClient("127.0.0.1", proxy.port) as client:
        record = await client.wait(client.request("GET", "/first", LATTICE_HOST))
        client.half_close()
        await asyncio.wait_for(client.closed.wait(), 5)
    assert record.status == 200 and record.ended
