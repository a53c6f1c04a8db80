"""A malformed request on an inbound HTTP/2 connection is a stream error (RFC 9113 §8.1.1), over
real loopback sockets with the `h2` library as the client (sending fields exactly as given).

Each malformed stream shares its connection with a valid upload still in flight: the malformed one
gets a 400 (its head is malformed) or RST_STREAM(PROTOCOL_ERROR) (its body length or trailers are),
never reaches the simulator, and is counted; the valid one then completes with a signature the
simulator verified, and the connection serves another request. What RFC 9113 calls a connection
error still gets GOAWAY. `test_fuzz.py` holds the same rules against h2's own validator.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from h2.errors import ErrorCodes

from grpc_support.h2client import H2TestClient, StreamRecord
from support.h2_peers import H2Script, H2TestServer
from support.polling import eventually
from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy

BASE = [(":method", "GET"), (":scheme", "http"), (":authority", LATTICE_HOST), (":path", "/malformed")]
POST = [(":method", "POST"), *BASE[1:]]


def _replace(fields, name, value):
    return [(n, value if n == name else v) for n, v in fields]


def _without(fields, name):
    return [(n, v) for n, v in fields if n != name]


# (fields, END_STREAM on the head): a 400 on that stream, nothing upstream
MALFORMED_HEADS = {
    "upper-case name": (BASE + [("X-Upper", "1")], True),
    "connection": (BASE + [("connection", "keep-alive")], True),
    "proxy-connection": (BASE + [("proxy-connection", "keep-alive")], True),
    "keep-alive": (BASE + [("keep-alive", "timeout=5")], True),
    "transfer-encoding": (POST + [("transfer-encoding", "chunked")], False),
    "upgrade": (BASE + [("upgrade", "websocket")], True),
    "te other than trailers": (BASE + [("te", "gzip")], True),
    "unknown pseudo-header": (BASE + [(":foo", "bar")], True),
    "response pseudo-header": ([(":status", "200"), *BASE], True),
    "informational :status": ([(":status", "100"), *BASE], False),
    "repeated pseudo-header": (BASE + [(":path", "/again")], True),
    "pseudo-header after a regular field": (BASE[:3] + [("x-a", "1"), BASE[3]], True),
    "missing :method": (_without(BASE, ":method"), True),
    "missing :scheme": (_without(BASE, ":scheme"), True),
    "missing :path": (_without(BASE, ":path"), True),
    "empty :path": (_replace(BASE, ":path", ""), True),
    "CONNECT with :path": (_replace(BASE, ":method", "CONNECT"), True),
    "space in :path": (_replace(BASE, ":path", "/a b"), True),
    "userinfo in :authority": (_replace(BASE, ":authority", "user@" + LATTICE_HOST), True),
    "CR in a value": (BASE + [("x-a", "a\rb")], True),
    "LF in a value": (BASE + [("x-a", "a\nb")], True),
    "NUL in a value": (BASE + [("x-a", "a\x00b")], True),
    "leading whitespace": (BASE + [("x-a", " a")], True),
    "trailing whitespace": (BASE + [("x-a", "a\t")], True),
    "space in a name": (BASE + [("x a", "1")], True),
    "colon in a name": (BASE + [("x:a", "1")], True),
    "separator in a name": (BASE + [("x(a)", "1")], True),
    "empty name": (BASE + [("", "1")], True),
    "host differs from :authority": (BASE + [("host", "other.example")], True),
    "two host fields": (BASE + [("host", LATTICE_HOST), ("host", LATTICE_HOST)], True),
    "content-length not a number": (POST + [("content-length", "1x")], False),
    "conflicting content-lengths": (POST + [("content-length", "1"), ("content-length", "2")], False),
    "content-length too long to parse": (POST + [("content-length", "9" * 5000)], False),
}

# (head fields, body, END_STREAM after the body, trailers or None, unended trailers):
# RST_STREAM(PROTOCOL_ERROR), nothing upstream (the whole stream leaves in one write)
MALFORMED_LATER = {
    "more DATA than content-length": (POST + [("content-length", "3")], b"abcd", False, None),
    "less DATA than content-length": (POST + [("content-length", "10")], b"abcd", True, None),
    "content-length but END_STREAM on the head": (POST + [("content-length", "5")], None, True, None),
    "pseudo-header in trailers": (POST, b"ab", False, [(":path", "/t")]),
    "upper-case trailer name": (POST, b"ab", False, [("X-T", "1")]),
    "connection-specific trailer": (POST, b"ab", False, [("connection", "close")]),
    "CR in a trailer value": (POST, b"ab", False, [("x-t", "a\rb")]),
    "trailers without END_STREAM": (POST, b"ab", False, "unended"),
}


def _errors(proxy, kind: str = "malformed_request") -> float:
    return proxy.metrics.registry.get_sample_value("sigv4proxy_errors_total", {"kind": kind}) or 0


async def _beside_a_slow_stream(sim, proxy, client: H2TestClient, send_malformed) -> StreamRecord:
    """Opens the valid neighbour (an upload whose head and first bytes are on their way upstream),
    sends the malformed stream, and only then ends the upload; checks the neighbour and that the
    connection serves on. Returns the malformed stream's record."""
    slow = client.request("POST", "/slow", LATTICE_HOST, [("x-sim-delay-ms", "50")], body=b"abc",
                          end_stream=False)
    assert await eventually(lambda: proxy.exchange.inflight == 1)
    record = await client.wait(send_malformed())
    assert not client.streams[slow].done.is_set()  # refused while its neighbour was in flight
    await client.send_data(slow, b"def", end_stream=True)
    slow_record = await client.wait(slow)
    after = await client.wait(client.request("GET", "/after", LATTICE_HOST))
    for valid in (slow_record, after):
        assert valid.status == 200 and valid.ended, valid
        assert json.loads(bytes(valid.body))["principal"] == PRINCIPAL  # verified by the simulator
    assert json.loads(bytes(slow_record.body))["body_length"] == 6
    assert client.goaway is None and not client.closed.is_set()
    paths = [r["requestPath"] for r in sim.records]
    assert sorted(paths) == ["/after", "/slow"], paths  # nothing of the malformed one went upstream
    return record


@pytest.mark.parametrize("case", MALFORMED_HEADS)
async def test_a_malformed_head_gets_400_on_its_stream_only(sim, case):
    fields, end_stream = MALFORMED_HEADS[case]
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        send = client.request_raw if fields[0][0] == ":status" else client.request_fields
        record = await _beside_a_slow_stream(sim, proxy, client, lambda: send(fields, end_stream=end_stream))
        assert record.status == 400, (case, record)
        assert record.header(b"x-sigv4proxy-error") == b"malformed_request"
        assert bytes(record.body).startswith(b"sigv4proxy: ") and record.ended
        if not end_stream:  # the client was still sending: told to stop once the answer is whole
            assert await eventually(lambda: record.reset_code == ErrorCodes.NO_ERROR)
        assert _errors(proxy) == 1


@pytest.mark.parametrize("case", MALFORMED_LATER)
async def test_a_malformed_body_or_trailers_get_rst_stream_on_its_stream_only(sim, case):
    fields, body, end_stream, trailers = MALFORMED_LATER[case]

    def send() -> int:  # the whole stream leaves in one write: refused before any of it is handled
        if trailers is None:
            return client.request_fields(fields, end_stream=end_stream, body=body)
        sid = client.request_fields(fields, end_stream=False, body=body, flush=False)
        unended = trailers == "unended"
        client.send_raw_headers(sid, [("x-t", "1")] if unended else trailers, end_stream=not unended)
        return sid

    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        record = await _beside_a_slow_stream(sim, proxy, client, send)
        assert record.status is None and record.reset_code == ErrorCodes.PROTOCOL_ERROR, (case, record)
        assert await eventually(lambda: _errors(proxy) == 1)
        assert proxy.exchange.inflight == 0


async def test_a_body_found_too_long_after_its_head_went_upstream_is_cut_there_too():
    async with H2TestServer(H2Script(stall=True)) as upstream, \
            running_proxy(upstream=f"http://127.0.0.1:{upstream.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        sid = client.request_fields(POST + [("content-length", "8")], end_stream=False)
        await client.send_data(sid, b"abcd")
        assert await eventually(lambda: upstream.stats.request_bytes_received == 4)  # streaming up
        await client.send_data(sid, b"efghij")  # 10 bytes against 8 declared
        record = await client.wait(sid)
        assert record.reset_code == ErrorCodes.PROTOCOL_ERROR and record.status is None
        assert await eventually(lambda: upstream.stats.active == 0)  # the upstream stream is reset
        assert upstream.stats.request_bytes_received == 4  # the excess never left
        assert await eventually(lambda: _errors(proxy) == 1 and proxy.exchange.inflight == 0)
        assert client.goaway is None and not client.closed.is_set()


async def test_a_malformed_grpc_call_gets_a_trailers_only_answer(sim):
    grpc = [(":method", "POST"), (":scheme", "http"), (":authority", LATTICE_HOST),
            (":path", "/pkg.Svc/Call"), ("content-type", "application/grpc"), ("te", "gzip")]
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        record = await _beside_a_slow_stream(sim, proxy, client, lambda: client.request_fields(grpc))
    assert record.status == 400 and record.head_end_stream
    assert record.header(b"grpc-status") == b"13" and record.header(b"x-sigv4proxy-error") == b"malformed_request"


async def test_what_the_rfc_allows_is_not_refused(sim):
    # RFC 9113 §8.3.1: host is compared with :authority after scheme-based normalization (case,
    # default port); `te: trailers` and a matching content-length are fine.
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        host = client.request("GET", "/host", LATTICE_HOST, [("host", LATTICE_HOST.upper() + ":80")])
        te = client.request("GET", "/te", LATTICE_HOST, [("te", "trailers")])
        sized = client.request_fields(POST + [("content-length", "4")], body=b"abcd")
        records = [await client.wait(sid) for sid in (host, te, sized)]
    for record in records:
        assert record.status == 200, record
        assert json.loads(bytes(record.body))["principal"] == PRINCIPAL
    assert json.loads(bytes(records[2].body))["body_length"] == 4
    assert _errors(proxy) == 0


@pytest.mark.parametrize("frame", ["data on stream 0", "undecodable header block"])
async def test_a_connection_error_still_gets_goaway(sim, frame):
    raw = {  # built by hand: hyperframe refuses to build the first
        "data on stream 0": b"\x00\x00\x01" b"\x00" b"\x00" b"\x00\x00\x00\x00" b"x",
        # HPACK index 0 (RFC 7541 §6.1): a decoding error, after which the tables are out of step
        "undecodable header block": b"\x00\x00\x01" b"\x01" b"\x05" b"\x00\x00\x00\x29" b"\x80",
    }[frame]
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        ok = await client.wait(client.request("GET", "/before", LATTICE_HOST))
        client.send_raw(raw)
        await asyncio.wait_for(client.closed.wait(), 10)
    assert ok.status == 200
    assert client.goaway is not None and client.goaway.error_code in (
        ErrorCodes.PROTOCOL_ERROR, ErrorCodes.COMPRESSION_ERROR), client.goaway
    assert _errors(proxy) == 0


async def test_the_same_head_again_on_one_connection_is_judged_each_time(sim):
    """h2's encoder sends a repeated head as the same indices into the dynamic table: the lean
    server decodes it and judges it once, and each stream still gets that judgement in full (a
    valid head proxied and signed every time, a malformed one refused every time)."""
    valid = BASE + [("x-a", "1")]
    malformed = BASE + [("x-a", "a\rb")]
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy, \
            H2TestClient("127.0.0.1", proxy.port, validate=False) as client:
        for fields, status in ((valid, 200), (malformed, 400), (valid, 200), (malformed, 400)):
            for _ in range(3):
                record = await client.wait(client.request_fields(fields))
                assert record.status == status and record.ended, record
                if status == 200:
                    assert json.loads(bytes(record.body))["principal"] == PRINCIPAL
                else:
                    assert record.header(b"x-sigv4proxy-error") == b"malformed_request"
        assert _errors(proxy) == 6
        assert [r["requestPath"] for r in sim.records] == ["/malformed"] * 6
        assert client.goaway is None and not client.closed.is_set()
