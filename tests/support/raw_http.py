"""Raw sockets for tests that must control every byte: a connected loopback TCP pair, small fixed
socket buffers, and an HTTP/1.1 response read off an asyncio stream."""

from __future__ import annotations

import asyncio
import socket


def small_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # fixed, not autotuned
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)


async def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(outer, inner): a connected loopback TCP pair, both non-blocking."""
    listener = socket.socket()
    if small:
        small_buffers(listener)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    outer = socket.socket()
    if small:
        small_buffers(outer)
    outer.setblocking(False)
    loop = asyncio.get_running_loop()
    connecting = loop.sock_connect(outer, listener.getsockname())
    inner, _ = await asyncio.gather(loop.sock_accept(listener), connecting)
    listener.close()
    inner[0].setblocking(False)
    return outer, inner[0]


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, lower-cased fields, body) of a Content-Length response."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    fields = {name.strip().lower(): value.strip() for name, value in (line.split(b":", 1) for line in lines)}
    return status, fields, await reader.readexactly(int(fields[b"content-length"]))
