"""Inbound connection limits: a slow request head (slowloris) is cut at --header-timeout."""

from __future__ import annotations

import asyncio
import time

from support.proxy import LATTICE_HOST, running_proxy


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
