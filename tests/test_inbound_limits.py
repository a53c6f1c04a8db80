"""Inbound connection limits: a slow request head (slowloris) is cut at --header-timeout; accepted
sockets take --recv-buffer (what one read may take in) and uploads still arrive whole."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time

import aiohttp

from support.proxy import LATTICE_HOST, PRINCIPAL, running_proxy


async def test_connection_without_a_complete_head_is_closed_at_the_header_timeout():
    async with running_proxy(upstream="http://127.0.0.1:9", header_timeout=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: ")  # and then nothing more
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 5)
        elapsed = time.monotonic() - started
        writer.close()
    assert data == b"" and 0.3 < elapsed < 3


async def test_a_prompt_request_on_a_kept_connection_is_not_cut():
    async with running_proxy(allow_host=["nothing.example"], header_timeout=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for _ in range(2):
            writer.write(f"GET / HTTP/1.1\r\nHost: {LATTICE_HOST}\r\n\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.startswith(b"HTTP/1.1 403")
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            await reader.readexactly(len(b"sigv4proxy: host is not in the allow-list\n"))
            await asyncio.sleep(0.7)  # past the head timeout: the connection has had a request
        writer.close()


async def test_a_silent_connection_and_a_dribbled_preface_are_closed_at_the_header_timeout():
    async with running_proxy(upstream="http://127.0.0.1:9", header_timeout=0.5) as proxy:
        for first in (b"", b"PRI * HTTP/2.0\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(first)
            started = time.monotonic()
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert data == b"" and time.monotonic() - started < 3


async def _accepted_recv_buffer(proxy) -> int:
    """SO_RCVBUF of the proxy's side of a fresh connection (held undecided until it speaks)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for _ in range(200):
            if proxy._listener.undecided:
                break
            await asyncio.sleep(0.01)
        (sniffer,) = proxy._listener.undecided
        sock = sniffer._transport.get_extra_info("socket")
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        writer.close()


async def test_accepted_sockets_take_the_configured_receive_buffer():
    # Linux reports twice the requested size (its bookkeeping share); 0 leaves the kernel default.
    async with running_proxy(upstream="http://127.0.0.1:9", recv_buffer=40000) as proxy:
        assert await _accepted_recv_buffer(proxy) == 80000
    async with running_proxy(upstream="http://127.0.0.1:9", recv_buffer=0) as proxy:
        assert await _accepted_recv_buffer(proxy) != 80000
    async with running_proxy(upstream="http://127.0.0.1:9") as proxy:
        assert proxy.config.recv_buffer == 65536
        assert await _accepted_recv_buffer(proxy) == 131072


async def test_uploads_arrive_whole_through_a_tiny_receive_buffer(sim):
    body = os.urandom(3 * 1024 * 1024 + 17)
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                             recv_buffer=4096) as proxy:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"http://127.0.0.1:{proxy.port}/up", data=body,
                                   headers={"Host": LATTICE_HOST}) as resp:
                seen = json.loads(await resp.read())
    assert resp.status == 200
    assert seen["principal"] == PRINCIPAL
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
