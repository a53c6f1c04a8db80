"""Small request bodies (declared Content-Length up to limits.SMALL_BODY) are read whole before
the upstream request starts, larger ones stream. What must hold either side of that line: the
bytes arrive intact and the signature verifies at the simulator; a body that arrives slowly is
still forwarded; a body that stops arriving is a 408 after --read-timeout and nothing reaches the
upstream; a body cut short is refused, never forwarded short; Expect: 100-continue still works.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import aiohttp
import pytest

from sigv4proxy.limits import SMALL_BODY
from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy
from test_faults_upstream import IO_TIMEOUT, ScriptedH2Upstream, echo, error_count, h2_upstream, read_response

HOST = LATTICE_HOST.encode()


def post_head(path: str, length: int, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), HOST, length, extra)


def assert_verified(answer: bytes, body: bytes) -> dict:
    """The simulator re-verified the signature and received exactly `body`."""
    seen = json.loads(answer)
    assert seen["principal"] == PRINCIPAL
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    return seen


@pytest.mark.parametrize("protocol, impl", [("http1", "lean"), ("h2", "lean"), ("h2", "h2")])
async def test_bodies_either_side_of_the_small_body_line_arrive_intact_and_verify(sim, protocol, impl):
    sizes = [1, 4096, SMALL_BODY - 1, SMALL_BODY, SMALL_BODY + 1, 300_000]
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=protocol,
                             h2_implementation=impl) as proxy:
        async with aiohttp.ClientSession() as client:
            for size in sizes:
                body = os.urandom(size)
                async with client.post(f"http://127.0.0.1:{proxy.port}/up/{size}", data=body,
                                       headers={"Host": LATTICE_HOST}) as resp:
                    raw = await resp.read()
                assert resp.status == 200, (size, raw)
                assert assert_verified(raw, body)["body_length"] == size


async def test_a_small_body_sent_in_slow_pieces_is_forwarded_whole(sim):
    body = os.urandom(10_000)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1",
                             read_timeout=5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(post_head("/slow", len(body)))
            for start in range(0, len(body), 2500):  # 4 pieces, 0.1 s apart
                writer.write(body[start:start + 2500])
                await writer.drain()
                await asyncio.sleep(0.1)
            resp = await read_response(reader)
        finally:
            writer.close()
    assert resp.status == 200, resp.body
    assert_verified(resp.body, body)


async def test_a_small_body_that_stops_arriving_is_a_408_and_never_forwarded():
    async with ScriptedH2Upstream(echo) as peer:
        async with running_proxy(**h2_upstream(peer.port, read_timeout=0.5)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                started = time.monotonic()
                writer.write(post_head("/stall", 1000) + b"x" * 400)  # then nothing more
                resp = await read_response(reader)
                waited = time.monotonic() - started
            finally:
                writer.close()
            assert resp.status == 408
            assert resp.header("x-sigv4proxy-error") == "request_timeout"
            assert b"request body stalled" in resp.body
            assert 0.4 < waited < IO_TIMEOUT
            assert peer.log.requests == []  # the upstream never saw a partial request
            assert await error_count(proxy, "request_timeout") == 1


async def test_a_small_body_cut_short_is_never_forwarded():
    async with ScriptedH2Upstream(echo) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(post_head("/short", 1000) + b"x" * 400)
                await writer.drain()
                writer.write_eof()  # the client is done sending, 600 bytes short
                async with asyncio.timeout(IO_TIMEOUT):
                    answer = await reader.read()
            finally:
                writer.close()
            # Either a 400 naming the reason or a closed connection: never a forwarded request.
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:200]
            await asyncio.sleep(0.1)
            assert peer.log.requests == []
            # The proxy still serves the next client.
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(post_head("/after", 3) + b"abc")
                resp = await read_response(reader)
            finally:
                writer.close()
            assert resp.status == 200 and json.loads(resp.body)["body_length"] == 3


async def test_expect_100_continue_with_a_small_body_gets_continue_then_the_answer(sim):
    body = b"hello, lattice"
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(post_head("/expect", len(body), b"Expect: 100-continue\r\n"))
            interim = await read_response(reader)
            assert interim.status == 100
            writer.write(body)
            resp = await read_response(reader)
        finally:
            writer.close()
    assert resp.status == 200, resp.body
    assert_verified(resp.body, body)
