"""Hostile input on the inbound side, as raw bytes (aiohttp's client would normalize them away).

The proxy answers malformed and smuggling-shaped requests with 400 (431 for a header section over
the limit, 413 for a body over `max_body_size`) in its own words (no echo of the offending bytes),
never lets an allow-list bypass through, replaces client-supplied signing headers, keeps serving
valid requests under a slowloris crowd, and sheds load beyond `max_inflight` with a fast 503.
Behind the proxy is the Lattice simulator, which re-verifies the signature and records every
request it receives: "never forwarded" means its record list stays empty.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy
from test_faults_upstream import IO_TIMEOUT, raw_request, read_response


H = LATTICE_HOST.encode()
LEAK = b"LEAKED-MARKER-7f3a"  # must never be echoed back in an error body


def via(sim, **extra) -> dict:
    return dict(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2", **extra)


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /p HTTP/1.1\r\nHost: " + H + b"\r\n" + headers + b"\r\n" + body


MALFORMED = {
    "garbage request line": b"GARBAGE " + LEAK + b"\r\n\r\n",
    "unknown version": b"GET / HTTP/9.9\r\nHost: " + H + b"\r\n\r\n",
    "space in header name": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nBad " + LEAK + b": x\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\n" + LEAK + b"\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-A : " + LEAK + b"\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-A: one\r\n " + LEAK + b"\r\n\r\n",
    "bare LF line endings": b"GET / HTTP/1.1\nHost: " + H + b"\nX-A: " + LEAK + b"\n\n",
    "bare LF after a header": b"GET / HTTP/1.1\r\nHost: " + H + b"\nX-A: " + LEAK + b"\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-A: a\rInjected: " + LEAK + b"\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-A: a\x00" + LEAK + b"\r\n\r\n",
    "CL and TE": post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "TE and CL": post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "duplicate CL, different values": post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    "CL list": post(b"Content-Length: 5, 6\r\n", b"hello!"),
    "CL negative": post(b"Content-Length: -1\r\n"),
    "CL with plus sign": post(b"Content-Length: +5\r\n", b"hello"),
    "TE chunked twice": post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "TE chunked, chunked": post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
    "TE xchunked": post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
    "TE chunked not last": post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    "TE with space before colon": post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
    "chunk size not hex": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk size negative": post(b"Transfer-Encoding: chunked\r\n", b"-1\r\nabc\r\n0\r\n\r\n"),
    "chunk size 0x prefix": post(b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n"),
    "chunk size overflow": post(b"Transfer-Encoding: chunked\r\n", b"f" * 20 + b"\r\nabc\r\n0\r\n\r\n"),
    "two Host headers": b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nHost: example.com\r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\n\r\n",
    "absolute-form host differs from Host":
        b"GET http://" + H + b"/ HTTP/1.1\r\nHost: other.vpc-lattice-svcs.us-west-2.on.aws\r\n\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: " + H + b"\r\n\r\n",
    "authority-form GET": b"GET " + H + b":443 HTTP/1.1\r\nHost: " + H + b"\r\n\r\n",
    "fragment in absolute-form": b"GET http://" + H + b"/a#frag HTTP/1.1\r\nHost: " + H + b"\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_and_smuggling_shapes_are_400_and_never_forwarded(sim, request_bytes):
    async with running_proxy(**via(sim)) as proxy:
        resp = await raw_request(proxy.port, request_bytes)
        assert resp.status == 400, resp
        assert resp.header("x-sigv4proxy-error") == "bad_request"
        assert resp.body.startswith(b"sigv4proxy: ") and LEAK not in resp.body
        assert resp.header("server") == "sigv4proxy"  # not aiohttp's, with its versions
        ok = await raw_request(proxy.port, b"GET /still HTTP/1.1\r\nHost: " + H + b"\r\n\r\n")
        assert ok.status == 200
    assert [r["requestPath"] for r in sim.records] == ["/still"]


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-Big: " + LEAK + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: " + H + b"\r\nX-" + b"n" * 20000 + b": v\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: " + H + b"\r\n" + b"".join(b"X-%d: %s\r\n" % (i, LEAK) for i in range(200)) + b"\r\n",
     431),
    (b"GET /" + LEAK + b"a" * 40000 + b" HTTP/1.1\r\nHost: " + H + b"\r\n\r\n", 400),
], ids=["one huge value", "one huge name", "too many headers", "request line too long"])
async def test_oversized_header_sections_are_431(sim, request_bytes, status):
    async with running_proxy(**via(sim)) as proxy:
        resp = await raw_request(proxy.port, request_bytes)
        assert resp.status == status, resp
        assert resp.header("x-sigv4proxy-error") == ("headers_too_large" if status == 431 else "bad_request")
        assert LEAK not in resp.body
        errors = proxy.metrics.registry.get_sample_value(
            "sigv4proxy_errors_total", {"kind": resp.header("x-sigv4proxy-error")})
        assert errors == 1
    assert sim.records == []


async def test_parse_errors_are_not_logged_above_debug_with_request_bytes(sim, caplog):
    caplog.set_level("DEBUG")
    async with running_proxy(**via(sim)) as proxy:
        for request_bytes in MALFORMED.values():
            await raw_request(proxy.port, request_bytes)
    loud = [r for r in caplog.records if r.levelno >= 30]
    assert loud == [], [r.getMessage()[:80] for r in loud]
    assert LEAK.decode() not in caplog.text


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_max_body_size_is_413(sim, framing):
    body = b"x" * 5000
    if framing == "content-length":
        request = post(b"Content-Length: 5000\r\n", body)
    else:
        request = post(b"Transfer-Encoding: chunked\r\n",
                       b"".join(b"3e8\r\n" + body[i:i + 1000] + b"\r\n" for i in range(0, 5000, 1000)) + b"0\r\n\r\n")
    async with running_proxy(**via(sim, max_body_size=2000)) as proxy:
        resp = await raw_request(proxy.port, request)
        assert resp.status == 413 and resp.header("x-sigv4proxy-error") == "payload_too_large"
        small = await raw_request(proxy.port, post(b"Content-Length: 2000\r\n", b"y" * 2000))
        assert small.status == 200 and json.loads(small.body)["body_length"] == 2000
    # Nothing over the limit ever completed upstream (chunked may have started a stream: reset).
    assert all(r["bytesReceived"] <= 2000 for r in sim.records)
    assert [r["responseCode"] for r in sim.records if r["bytesReceived"] == 2000] == [200]


BYPASS_HOSTS = {
    # Host value: expected status (403 not allowed, 400 malformed); none may reach the upstream.
    "example.com": 403,
    "EXAMPLE.COM.": 403,
    "example.com:443": 403,
    LATTICE_HOST + ".evil.com": 403,
    LATTICE_HOST + ".evil.com.": 403,
    "evil.com#." + LATTICE_HOST: 400,
    "evil.com/." + LATTICE_HOST: 400,
    "evil.com%2e" + LATTICE_HOST: 400,
    LATTICE_HOST.replace(".", "%2E"): 400,
    "evil.com\\." + LATTICE_HOST: 400,
    "user@" + LATTICE_HOST: 400,
    LATTICE_HOST + "@evil.com": 400,
    LATTICE_HOST + ":443@evil.com": 400,
    LATTICE_HOST + ":99999": 400,
    LATTICE_HOST + ":-1": 400,
    "127.0.0.1": 403,
    "169.254.169.254": 403,
    "2130706433": 403,
    "0x7f.0.0.1": 403,
    "[::1]": 403,
    "[::ffff:169.254.169.254]": 403,
    "[::1": 400,
    "evil..com": 400,
    "": 400,
}


@pytest.mark.parametrize("form", ["host-header", "absolute-form"])
async def test_allow_list_bypass_attempts_never_reach_upstream(sim, form):
    async with running_proxy(**via(sim)) as proxy:
        for host, status in BYPASS_HOSTS.items():
            h = host.encode()
            if form == "host-header":
                request = b"GET /x HTTP/1.1\r\nHost: " + h + b"\r\n\r\n"
            else:
                request = b"GET http://" + h + b"/x HTTP/1.1\r\nHost: " + h + b"\r\n\r\n"
            resp = await raw_request(proxy.port, request)
            assert resp.status in (status, 400), (host, resp.status)
            assert resp.status != 200 and resp.body.startswith(b"sigv4proxy: "), host
        # Spellings of the allowed host itself normalize to it and are served.
        for spelling in (LATTICE_HOST.upper(), LATTICE_HOST + ".", LATTICE_HOST + ":443"):
            resp = await raw_request(proxy.port, b"GET /ok HTTP/1.1\r\nHost: " + spelling.encode() + b"\r\n\r\n")
            assert resp.status == 200 and json.loads(resp.body)["authority"] == LATTICE_HOST
    assert [r["requestPath"] for r in sim.records] == ["/ok"] * 3


async def test_client_signing_headers_are_replaced_never_forwarded(sim):
    forged = (b"Authorization: AWS4-HMAC-SHA256 Credential=AKIDFORGED/20200101/us-west-2/vpc-lattice-svcs/"
              b"aws4_request, SignedHeaders=host, Signature=" + b"0" * 64 + b"\r\n"
              b"X-Amz-Date: 20000101T000000Z\r\nX-Amz-Security-Token: forged-token\r\n"
              b"X-Amz-Content-Sha256: " + b"a" * 64 + b"\r\nX-Amz-Region-Set: *\r\n"
              b"authorization: second-forged\r\nX-Amz-Target: kept.Operation\r\n")
    async with running_proxy(**via(sim)) as proxy:
        resp = await raw_request(proxy.port, b"GET /sig HTTP/1.1\r\nHost: " + H + b"\r\n" + forged + b"\r\n")
    assert resp.status == 200
    echo = json.loads(resp.body)
    assert echo["principal"] == PRINCIPAL  # the simulator verified OUR signature
    received = [(n.lower(), v) for n, v in echo["headers"]]
    names = [n for n, _ in received]
    for name in ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"):
        assert names.count(name) == 1, name
    values = dict(received)
    assert values["x-amz-date"] != "20000101T000000Z"
    assert values["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert "x-amz-region-set" not in names
    assert values["x-amz-target"] == "kept.Operation"
    assert "forged" not in resp.body.decode()


async def test_encoded_crlf_in_the_target_stays_encoded(sim):
    async with running_proxy(**via(sim)) as proxy:
        resp = await raw_request(proxy.port, b"GET /a%0d%0aX-Injected:%201?q=%0d%0a HTTP/1.1\r\nHost: " + H + b"\r\n\r\n")
    assert resp.status == 200
    echo = json.loads(resp.body)
    assert echo["path"] == "/a%0d%0aX-Injected:%201" and echo["query"] == "q=%0d%0a"
    assert "x-injected" not in [n.lower() for n, _ in echo["headers"]]


async def test_slowloris_crowd_does_not_stop_valid_requests(sim):
    crowd_size, rounds = 300, 4
    async with running_proxy(**via(sim)) as proxy:
        crowd = []
        for _ in range(crowd_size):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /slow HTTP/1.1\r\n")
            crowd.append(writer)
        try:
            served = []
            for i in range(rounds):  # one header byte per socket per round (~0.5 s apart)
                for writer in crowd:
                    writer.write(b"X")
                started = time.monotonic()
                results = await asyncio.gather(*(raw_request(proxy.port, b"GET /ok/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, H))
                                                 for _ in range(5)))
                served.append(time.monotonic() - started)
                assert [r.status for r in results] == [200] * 5
                await asyncio.sleep(0.5)
            assert max(served) < 3.0, served
        finally:
            for writer in crowd:
                writer.close()
    assert len(sim.records) == 5 * rounds and all(r["requestPath"].startswith("/ok/") for r in sim.records)


async def test_more_than_max_inflight_gets_fast_503_with_retry_after(sim):
    async with running_proxy(**via(sim, max_inflight=4)) as proxy:
        async def one(i: int):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                started = time.monotonic()
                writer.write(b"GET /busy/%d HTTP/1.1\r\nHost: %s\r\nx-sim-delay-ms: 800\r\n\r\n" % (i, H))
                resp = await read_response(reader, IO_TIMEOUT)
                return resp, time.monotonic() - started
            finally:
                writer.close()

        results = await asyncio.gather(*(one(i) for i in range(16)))
        statuses = sorted(r.status for r, _ in results)
        assert statuses.count(200) >= 4 and statuses.count(503) >= 8, statuses
        for resp, took in results:
            if resp.status == 503:
                assert resp.header("x-sigv4proxy-error") == "overloaded"
                assert resp.header("retry-after") == "1"
                assert took < 0.6, took  # shed at once, not queued behind the 800 ms requests
        assert proxy.exchange.inflight == 0
    assert len(sim.records) == statuses.count(200)
