"""Client faults, through the proxy: the client hangs up mid-upload, mid-download or while the
upstream is still thinking; pipelines requests; holds idle connections.

What must hold: the upstream stream is cancelled (the scripted peer receives RST_STREAM), the
upstream connection stays up for everyone else, no task is left behind, pipelined requests are
answered in order, and idle sockets do not stop others from being served.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

from h2.errors import ErrorCodes
from support.proxy import LATTICE_HOST, running_proxy
from test_faults_upstream import (
    IO_TIMEOUT,
    Exchange,
    ScriptedH2Upstream,
    echo,
    get,
    h2_upstream,
    raw_request,
    read_response,
    wait_until,
)

HOST = LATTICE_HOST.encode()


async def settled_task_count(limit: int, timeout: float = 5.0) -> int:
    """Waits (bounded) for the number of tasks to come back to `limit` and returns the count."""
    count = len(asyncio.all_tasks())
    for _ in range(int(timeout / 0.02)):
        count = len(asyncio.all_tasks())
        if count <= limit:
            break
        await asyncio.sleep(0.02)
    return count


def hard_close(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the way a crashed client goes away."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def slow_script(ex: Exchange) -> None:
    if ex.path == "/download":
        ex.respond(200, headers=[(b"content-length", b"50000000")], end=False)
        await ex.send_body(50_000_000, pause=0.005)
    elif ex.path == "/think":
        await asyncio.sleep(30)  # cancelled when the stream is reset or the peer closes
    elif ex.path == "/first":
        await asyncio.sleep(0.3)  # answered later than /second would be, if it could overtake
        await echo(ex)
    else:
        await echo(ex)


async def _baseline(proxy, peer) -> int:
    warm = await raw_request(proxy.port, get("/warm"))  # the upstream connection now exists
    assert warm.status == 200
    await asyncio.sleep(0.05)
    return len(asyncio.all_tasks())


async def _still_serving(proxy, peer) -> None:
    after = await raw_request(proxy.port, get("/after"))
    assert after.status == 200
    assert json.loads(after.body)["conn"] == 1 and peer.log.connections == 1  # connection kept


async def test_disconnect_mid_upload_cancels_the_upstream_stream():
    async with ScriptedH2Upstream(slow_script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            tasks_before = await _baseline(proxy, peer)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: 1000000\r\n\r\n" % HOST)
            writer.write(b"u" * 100_000)
            await wait_until(lambda: peer.log.data_received >= 50_000)
            hard_close(writer)
            await wait_until(lambda: any(code == ErrorCodes.CANCEL for _, _, code in peer.log.resets))
            assert [p for _, _, p in peer.log.requests] == ["/warm"]  # the upload never completed
            assert await settled_task_count(tasks_before) <= tasks_before
            await _still_serving(proxy, peer)


async def test_disconnect_mid_download_cancels_the_upstream_stream():
    async with ScriptedH2Upstream(slow_script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            tasks_before = await _baseline(proxy, peer)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(get("/download"))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            await asyncio.wait_for(reader.readexactly(100_000), IO_TIMEOUT)
            hard_close(writer)
            await wait_until(lambda: len(peer.log.resets) == 1)
            conn, stream, code = peer.log.resets[0]
            assert conn == 1 and code == ErrorCodes.CANCEL
            assert await settled_task_count(tasks_before) <= tasks_before
            await _still_serving(proxy, peer)


async def test_disconnect_while_upstream_thinks_cancels_the_upstream_stream():
    async with ScriptedH2Upstream(slow_script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            tasks_before = await _baseline(proxy, peer)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(get("/think"))
            await wait_until(lambda: len(peer.log.requests) == 2)
            hard_close(writer)
            await wait_until(lambda: len(peer.log.resets) == 1)
            assert peer.log.resets[0][2] == ErrorCodes.CANCEL
            assert await settled_task_count(tasks_before) <= tasks_before
            await _still_serving(proxy, peer)


async def test_pipelined_requests_are_answered_in_order():
    async with ScriptedH2Upstream(slow_script) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(get("/first") + get("/second") + get("/third", b"Connection: close\r\n"))
                answers = [await read_response(reader) for _ in range(3)]
                assert [a.status for a in answers] == [200, 200, 200]
                assert [json.loads(a.body)["path"] for a in answers] == ["/first", "/second", "/third"]
                assert await asyncio.wait_for(reader.read(), IO_TIMEOUT) == b""  # closed as asked
            finally:
                writer.close()


async def test_idle_connections_do_not_stop_others_from_being_served():
    async with ScriptedH2Upstream(echo) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            idle = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(100)]
            # Half of them also sent half a request head, then went quiet.
            for _, writer in idle[::2]:
                writer.write(b"GET /partial HTTP/1.1\r\nHost: ")
            try:
                results = await asyncio.gather(*(raw_request(proxy.port, get(f"/ok/{i}"))
                                                 for i in range(20)))
                assert [r.status for r in results] == [200] * 20
                assert all(p.startswith("/ok/") for _, _, p in peer.log.requests)
            finally:
                for _, writer in idle:
                    writer.close()


async def test_half_close_after_the_request_is_still_answered():
    # RFC 9112 §9.6: a client may shut down its sending side once the request is out.
    async with ScriptedH2Upstream(echo) as peer:
        async with running_proxy(**h2_upstream(peer.port)) as proxy:
            for request in (get("/half"), b"POST /half-post HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\nhello" % HOST):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(request)
                writer.write_eof()
                resp = await read_response(reader)
                assert resp.status == 200 and resp.complete
                assert await asyncio.wait_for(reader.read(), IO_TIMEOUT) == b""  # then closed
                writer.close()
            # Half-closed in the middle of a body: the request cannot complete; closed, no hang.
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /cut HTTP/1.1\r\nHost: %s\r\nContent-Length: 50\r\n\r\nonly-some" % HOST)
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
            assert not rest.startswith(b"HTTP/1.1 200")
            writer.close()
            assert [p for _, _, p in peer.log.requests] == ["/half", "/half-post"]


async def test_client_silent_mid_upload_gets_408_and_the_upstream_stream_is_cancelled():
    async with ScriptedH2Upstream(slow_script) as peer:
        async with running_proxy(**h2_upstream(peer.port, read_timeout=0.5)) as proxy:
            await _baseline(proxy, peer)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: 1000000\r\n\r\n" % HOST)
                writer.write(b"u" * 100_000)  # then silence, connection open
                answer = await read_response(reader)
            finally:
                writer.close()
            assert answer.status == 408
            assert answer.header("x-sigv4proxy-error") == "request_timeout"
            await wait_until(lambda: any(code == ErrorCodes.CANCEL for _, _, code in peer.log.resets))
            assert [p for _, _, p in peer.log.requests] == ["/warm"]  # never completed upstream
            await _still_serving(proxy, peer)


async def test_client_silent_mid_chunked_upload_over_http1_upstream_gets_408(sim):
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="http1",
                             read_timeout=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % HOST)
            writer.write(b"1000\r\n" + b"c" * 0x1000 + b"\r\n")  # one chunk, then silence
            answer = await read_response(reader)
        finally:
            writer.close()
        assert answer.status == 408
        assert answer.header("x-sigv4proxy-error") == "request_timeout"
        after = await raw_request(proxy.port, get("/after"))
        assert after.status == 200
