"""A fast-enough local upstream for `make bench` when nginx cannot be had.

Owns: a loopback-only HTTP/1.1 server and an h2c (prior knowledge) server, both answering every
request with 200 and a fixed body after reading (and discarding) the whole request body. uvloop
and raw asyncio protocols keep it lean. It must never bind anything but 127.0.0.1, never buffer a
body it only has to discard, and never log per request.

Run: python benchmarks/upstream_fallback.py --h1-port P --h2c-port Q [--body-bytes 64]
It prints `ready` on stdout once both ports listen, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

MAX_HEAD_BYTES = 64 * 1024


class Http1Protocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1: Content-Length and chunked request bodies, pipelining tolerated."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = 0  # bytes of a Content-Length body still to discard
        self.chunked = False  # inside a chunked body
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while self._step():
                pass
        except ValueError:
            self._fail(b"400 Bad Request")

    def _fail(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()
        self.buffer.clear()

    def _respond(self) -> None:
        assert self.transport is not None
        self.transport.write(self.response)
        if self.close_after:
            self.transport.close()

    def _step(self) -> bool:
        """Consume what the buffer allows; True when progress was made and more may follow."""
        if self.body_left:
            taken = min(self.body_left, len(self.buffer))
            del self.buffer[:taken]
            self.body_left -= taken
            if self.body_left:
                return False
            self._respond()
            return bool(self.buffer)
        if self.chunked:
            return self._step_chunk()
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._fail(b"431 Request Header Fields Too Large")
            return False
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[: end + 4]
        lines = head.split(b"\r\n")
        if len(lines[0].split(b" ")) != 3:
            raise ValueError("bad request line")
        self.close_after = lines[0].endswith(b"http/1.0")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and value.endswith(b"chunked"):
                self.chunked = True
            elif name == b"connection":
                self.close_after = value == b"close"
        if self.chunked:
            return True
        if length:
            self.body_left = length
            return True
        self._respond()
        return bool(self.buffer)

    def _step_chunk(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
        if size == 0:
            # Last chunk: skip trailers up to the blank line.
            blank = self.buffer.find(b"\r\n\r\n", end)
            if blank < 0:
                return False
            del self.buffer[: blank + 4]
            self.chunked = False
            self._respond()
            return bool(self.buffer)
        if len(self.buffer) < end + 2 + size + 2:
            return False
        del self.buffer[: end + 2 + size + 2]
        return True


class H2cProtocol(asyncio.Protocol):
    """h2c with prior knowledge: answer each stream once its request body has ended."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers = [(b":status", b"200"), (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(len(body)).encode())]
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=False,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 512,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 30)
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._respond(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
                return
        self.transport.write(self.conn.data_to_send())

    def _respond(self, stream_id: int) -> None:
        try:
            self.conn.send_headers(stream_id, self.headers)
            self.conn.send_data(stream_id, self.body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass  # the client reset the stream meanwhile


async def serve(h1_port: int, h2c_port: int, body_bytes: int) -> None:
    body = b"x" * body_bytes
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: Http1Protocol(response), "127.0.0.1", h1_port, backlog=1024),
        await loop.create_server(lambda: H2cProtocol(body), "127.0.0.1", h2c_port, backlog=1024),
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h1-port", type=int, required=True)
    parser.add_argument("--h2c-port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(serve(args.h1_port, args.h2c_port, args.body_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
