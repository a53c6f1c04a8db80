"""Scriptable HTTP/2 test servers (server side of `h2`) for the upstream client tests.

Owns: a loopback h2 server whose behaviour a test scripts (echo, streamed bodies, trailers,
GOAWAY mid-flight, REFUSED_STREAM, MAX_CONCURRENT_STREAMS, zero initial window, stall, close
mid-response) and counts what it saw. Must never: bind anything but loopback, or outlive its test
(use `async with`).

Routes: `/stream/<n>` n bytes of `pattern_bytes(n)`; `/trailers` a body plus trailers;
`/sensitive` a cookie header and a trailer sent never-indexed (HPACK), beside plain ones;
`/delay/<ms>` echo after a pause; anything else: the JSON echo of the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame

from support.loopback_server import LoopbackTestServer

_BLOCK = random.Random(1234).randbytes(64 * 1024)


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """Deterministic test content: the same n bytes for everyone who asks."""
    start = offset % len(_BLOCK)
    reps = (start + n) // len(_BLOCK) + 1
    return (_BLOCK * reps)[start:start + n]


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, n, len(_BLOCK)):
        digest.update(pattern_bytes(min(len(_BLOCK), n - offset), offset))
    return digest.hexdigest()


def echo_document(method: bytes, path: bytes, authority: bytes | None, scheme: bytes | None,
                  headers: list[tuple[bytes, bytes]], body_sha256: str, body_length: int) -> bytes:
    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("latin-1")

    return json.dumps({
        "method": text(method), "path": text(path), "authority": text(authority),
        "scheme": text(scheme), "headers": [[text(n), text(v)] for n, v in headers],
        "body_sha256": body_sha256, "body_length": body_length,
    }).encode()


@dataclass
class H2Script:
    max_concurrent_streams: int | None = None
    initial_window_size: int | None = None  # our receive window per request stream
    open_window_after: float | None = None  # then raise it to 1 MiB via SETTINGS
    refuse_first: int = 0  # RST_STREAM(REFUSED_STREAM) for the first N streams (server-wide)
    goaway_after: int | None = None  # first connection: serve N streams, GOAWAY(last=Nth), ignore rest
    stall: bool = False  # never answer
    close_mid_response: bool = False  # /stream/<n>: send half, then drop the connection
    stall_mid_response: bool = False  # /stream/<n>: send half, then go silent
    hold_request_window: bool = False  # do not acknowledge request body bytes (upload stalls)


@dataclass
class H2Stats:
    connections: int = 0
    streams: int = 0
    refused: int = 0
    active: int = 0
    peak_active: int = 0
    response_bytes_sent: int = 0
    request_bytes_received: int = 0
    request_data_frames: int = 0
    empty_data_frames: int = 0  # request DATA frames with no payload (an END_STREAM of its own)
    requests: list[dict] = field(default_factory=list)


class _ServerStream:
    __slots__ = ("id", "headers", "digest", "length", "reset")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.headers = headers
        self.digest = hashlib.sha256()
        self.length = 0
        self.reset = False


class _H2ServerConnection:
    def __init__(self, server: H2TestServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server, self.script, self.stats = server, server.script, server.stats
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=False,
                                           normalize_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, _ServerStream] = {}
        self.served = 0
        self.number = server.stats.connections  # 1 for the first connection
        self.goaway_sent = False
        self.pending_acks: list[tuple[int, int]] = []
        self.window_changed = asyncio.get_running_loop().create_future()
        self.tasks: set[asyncio.Task] = set()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        settings = {}
        if self.script.max_concurrent_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = self.script.max_concurrent_streams
        if self.script.initial_window_size is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = self.script.initial_window_size
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        self.flush()
        if self.script.open_window_after is not None:
            self.spawn(self._open_window_later(self.script.open_window_after))
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()
                    break
                for event in events:
                    self.handle(event)
                self.flush()
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for task in list(self.tasks):
                task.cancel()
            self._wake_senders()
            self.writer.close()

    async def _open_window_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.flush()

    def release_request_window(self) -> None:
        for stream_id, size in self.pending_acks:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                pass
        self.pending_acks.clear()
        self.flush()

    def _wake_senders(self) -> None:
        if not self.window_changed.done():
            self.window_changed.set_result(None)
        self.window_changed = asyncio.get_running_loop().create_future()

    def handle(self, event: h2.events.Event) -> None:
        stats = self.stats
        if isinstance(event, h2.events.RequestReceived):
            stats.streams += 1
            if self.server.refuse_remaining > 0:
                self.server.refuse_remaining -= 1
                stats.refused += 1
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            if self.goaway_sent:
                return  # above last_stream_id: never processed
            self.streams[event.stream_id] = _ServerStream(event.stream_id, list(event.headers))
            stats.active += 1
            stats.peak_active = max(stats.peak_active, stats.active)
            self.served += 1
            if (self.script.goaway_after is not None and self.number == 1
                    and self.served >= self.script.goaway_after):
                # Graceful GOAWAY written by hand: h2 would refuse to send anything after it.
                frame = GoAwayFrame(0)
                frame.last_stream_id = event.stream_id
                frame.error_code = 0
                self.flush()
                self.writer.write(frame.serialize())
                self.goaway_sent = True
            if event.stream_ended is not None:
                self.spawn(self.respond(self.streams[event.stream_id]))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.digest.update(event.data)
                stream.length += len(event.data)
            stats.request_bytes_received += len(event.data)
            stats.request_data_frames += 1
            stats.empty_data_frames += not event.data
            if self.script.hold_request_window:
                self.pending_acks.append((event.stream_id, event.flow_controlled_length))
            else:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if event.stream_ended is not None and stream is not None:
                self.spawn(self.respond(stream))
        elif isinstance(event, h2.events.StreamEnded):
            pass  # handled through stream_ended on the headers/data event
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.reset = True
                stats.active -= 1
            self._wake_senders()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged,
                                h2.events.SettingsAcknowledged)):
            self._wake_senders()

    async def respond(self, stream: _ServerStream) -> None:
        script = self.script
        try:
            if script.stall:
                await asyncio.Event().wait()  # cancelled when the connection ends
            headers = dict(stream.headers)
            path = headers.get(b":path", b"")
            tail = path.split(b"?", 1)[0].rsplit(b"/", 1)[-1]
            if path.startswith(b"/delay/"):
                await asyncio.sleep(int(tail) / 1000)
            if path.startswith(b"/stream/"):
                size = int(tail)
                self.h2.send_headers(stream.id, [(b":status", b"200"),
                                                 (b"content-length", str(size).encode())])
                cut = size // 2 if (script.close_mid_response or script.stall_mid_response) else size
                await self.send_body(stream, size, cut)
                if cut < size:
                    if script.close_mid_response:
                        self.writer.transport.abort()
                        return
                    await asyncio.Event().wait()
                self.h2.end_stream(stream.id)
            elif path.startswith(b"/status/"):  # the status bytes exactly as given, no body
                self.h2.send_headers(stream.id, [(b":status", tail)], end_stream=True)
            elif path == b"/sensitive":
                self.h2.send_headers(stream.id, [(b":status", b"200"), (b"x-plain", b"1"),
                                                 NeverIndexedHeaderTuple(b"set-cookie", b"s=secret")])
                self.h2.send_data(stream.id, b"ok")
                self.h2.send_headers(stream.id, [NeverIndexedHeaderTuple(b"x-token", b"t"),
                                                 (b"x-done", b"1")], end_stream=True)
            elif path == b"/trailers":
                self.h2.send_headers(stream.id, [(b":status", b"200")])
                self.h2.send_data(stream.id, b"body-before-trailers")
                self.h2.send_headers(stream.id, [(b"x-checksum", b"abc123"), (b"x-done", b"1")],
                                     end_stream=True)
            else:
                document = echo_document(
                    headers.get(b":method", b""), path, headers.get(b":authority"),
                    headers.get(b":scheme"), stream.headers, stream.digest.hexdigest(),
                    stream.length)
                self.stats.requests.append(json.loads(document))
                self.h2.send_headers(stream.id, [(b":status", b"200"),
                                                 (b"content-type", b"application/json"),
                                                 (b"content-length", str(len(document)).encode())])
                self.h2.send_data(stream.id, document, end_stream=True)
            self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        finally:
            if self.streams.pop(stream.id, None) is not None:
                self.stats.active -= 1

    async def send_body(self, stream: _ServerStream, size: int, stop_at: int) -> None:
        sent = 0
        while sent < stop_at:
            if stream.reset:
                raise h2.exceptions.StreamClosedError(stream.id)
            window = self.h2.local_flow_control_window(stream.id)
            if window <= 0:
                await asyncio.shield(self.window_changed)
                continue
            step = min(window, self.h2.max_outbound_frame_size, stop_at - sent)
            self.h2.send_data(stream.id, pattern_bytes(step, sent))
            sent += step
            self.stats.response_bytes_sent += step
            self.flush()
            await self.writer.drain()


class H2TestServer(LoopbackTestServer):
    """`async with H2TestServer(H2Script(...)) as server:` then connect to `server.port`."""

    def __init__(self, script: H2Script | None = None, ssl_context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> None:
        super().__init__(ssl_context, host)
        self.script = script or H2Script()
        self.stats = H2Stats()
        self.refuse_remaining = self.script.refuse_first
        self._connections: set[_H2ServerConnection] = set()
        # For TLS servers that also speak HTTP/1.1: called when ALPN is not h2.
        self.http1_handler = None

    def release_request_window(self) -> None:
        self.script.hold_request_window = False
        for conn in self._connections:
            conn.release_request_window()

    def drop_connections(self) -> None:
        for conn in self._connections:
            conn.writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else "h2"
            if alpn != "h2" and self.http1_handler is not None:
                await self.http1_handler(reader, writer)
                return
            self.stats.connections += 1
            conn = _H2ServerConnection(self, reader, writer)
            self._connections.add(conn)
            try:
                await conn.run()
            finally:
                self._connections.discard(conn)
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
