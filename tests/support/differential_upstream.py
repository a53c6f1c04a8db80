"""The upstream of the differential tests: one declared reply served the same way over HTTP/1.1
and h2c, recording each request as it arrived and verifying its SigV4 signature. (Lock-step tests,
whose upstream waits on the test between parts, use `support.scripted_upstream` instead.)

Owns: the reply script (1xx heads, the head, body parts with pauses, trailers, a break before or
after the head, what to do with an upload), its rendering per protocol (HTTP/1.1 written byte for
byte: status line with its reason, fields as scripted, our own framing; h2c through `h2`, which
cannot carry a reason or connection-specific fields), and one `Arrival` per request: fields in
arrival order with names as sent, body bytes, trailers, when each response part left (loop time),
and the verdict of the simulator's verifier (`sigv4proxy.sim.verify`, written apart from the
proxy's signer). Requests are parsed by h11 and h2, never by the proxy's own parsers.
Must never: bind anything but loopback, outlive its test (`async with`), or wait unbounded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11

from sigv4proxy.sim.identities import IdentityStore
from sigv4proxy.sim.verify import AuthFailure, RequestView, VerifyContext, verify_request
from support.loopback_server import LoopbackTestServer

Fields = tuple[tuple[bytes, bytes], ...]

IDLE = 20.0  # an upstream read waits at most this long (longer than any case)
REFUSAL_WATCH = 0.5  # after refusing an upload on its head: how long body bytes are still counted
BREAK_WATCH = 2.0  # after a break: how long we wait for the peer to close its side
# Connection-specific fields, which HTTP/2 cannot carry (RFC 9113 §8.2.2).
H2_ILLEGAL = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"upgrade", b"http2-settings", b"host"))


def h2_legal(fields) -> list[tuple[bytes, bytes]]:
    """Fields as an HTTP/2 peer sends them: lower-case names, without the connection-specific
    ones, what Connection names, or a TE other than `trailers` (RFC 9113 §8.2.2)."""
    lowered = [(n.lower(), v) for n, v in fields]
    named = {t.strip().lower() for n, v in lowered if n == b"connection" for t in v.split(b",")}
    return [(n, v) for n, v in lowered if n not in H2_ILLEGAL and n not in named
            and not (n == b"te" and v.strip().lower() != b"trailers")]


@dataclass(frozen=True)
class Head:
    """A response head: status, fields as scripted (names in the case they are sent over
    HTTP/1.1) and the HTTP/1.1 reason phrase."""

    status: int
    fields: Fields = ()
    reason: bytes = b"OK"


@dataclass(frozen=True)
class Reply:
    """What the upstream does with each request, over either protocol."""

    head: Head = Head(200)
    interim: tuple[Head, ...] = ()  # 1xx heads sent before `head`
    chunks: tuple[tuple[float, bytes], ...] = ()  # (pause before it, bytes)
    length: bool = True  # declare Content-Length (else HTTP/1.1 chunked, h2 bare DATA)
    declared: int | None = None  # the Content-Length to declare when it is not the body's
    trailers: Fields = ()
    cut_after: float | None = None  # the body's parts sent, pause this long, then break
    cut_before_head: bool = False  # break without answering at all
    # "read": read the whole body, then answer; "continue": answer `Expect: 100-continue` with
    # 100 first; "refuse": answer on the head alone and read none of the body.
    upload: str = "read"

    @property
    def body(self) -> bytes:
        return b"".join(part for _, part in self.chunks)


@dataclass
class Arrival:
    """One request as it reached the upstream."""

    protocol: str  # "http1" or "h2"
    method: bytes
    target: bytes
    authority: bytes | None  # h2 `:authority`; HTTP/1.1 has Host among the fields
    scheme: bytes | None
    fields: list[tuple[bytes, bytes]]  # names as sent, pseudo-headers left out
    body: bytes = b""  # after a refusal: every byte that still came within REFUSAL_WATCH
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    verdict: str = ""  # the signer's principal, or the verifier's exception name
    head_sent: float | None = None  # loop time the final head left
    sent: list[tuple[float, int]] = field(default_factory=list)  # (loop time, body bytes so far)


def _no_body(method: bytes, status: int) -> bool:
    return method == b"HEAD" or status in (204, 304)


def _framing(reply: Reply) -> list[tuple[bytes, bytes]]:
    if reply.head.status in (204, 304):
        return []
    if reply.length:
        size = len(reply.body) if reply.declared is None else reply.declared
        return [(b"Content-Length", str(size).encode())]
    return [(b"Transfer-Encoding", b"chunked")]


class ScriptedUpstream:
    """`async with ScriptedUpstream(script, identities) as up:` then `up.ports["http1" | "h2"]`;
    `script(target)` picks the reply for each request; `up.arrivals` lists what came."""

    def __init__(self, script: Callable[[bytes], Reply], identities: IdentityStore, *,
                 region: str = "us-west-2", service: str = "vpc-lattice-svcs") -> None:
        self.script = script
        self.identities, self.region, self.service = identities, region, service
        self.arrivals: list[Arrival] = []
        self._servers = {"http1": _H1Upstream(self), "h2": _H2Upstream(self)}
        self.ports: dict[str, int] = {}

    async def __aenter__(self) -> ScriptedUpstream:
        for name, server in self._servers.items():
            await server.__aenter__()
            self.ports[name] = server.port
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for server in self._servers.values():
            await server.__aexit__(*exc_info)

    def record(self, arrival: Arrival) -> None:
        """Verifies the signature from the bytes that arrived, then keeps the arrival."""
        def text(value: bytes) -> str:
            return value.decode("utf-8", "surrogateescape")

        headers = [(text(n).lower(), text(v)) for n, v in arrival.fields]
        if arrival.authority is not None:
            headers.insert(0, ("host", text(arrival.authority)))
        path, _, query = text(arrival.target).partition("?")
        try:
            verified = verify_request(RequestView(text(arrival.method), path, query, headers),
                                      VerifyContext(self.identities, self.region, self.service, time.time()))
            arrival.verdict = verified.identity.principal
        except AuthFailure as exc:
            arrival.verdict = exc.exception
        self.arrivals.append(arrival)


class _H1Upstream(LoopbackTestServer):
    """HTTP/1.1: requests parsed by h11 (a fresh parser per request, fed what the last one left
    over, so pipelined requests wait their turn); replies written as our own bytes."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        super().__init__()
        self.upstream = upstream

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, asyncio.TimeoutError, h11.ProtocolError):
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        leftover = b""
        while True:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
            if leftover:
                conn.receive_data(leftover)
            request = await self._next(conn, reader)
            if not isinstance(request, h11.Request):
                return
            reply = self.upstream.script(request.target)
            arrival = Arrival("http1", request.method, request.target, None, None,
                              list(request.headers.raw_items()))
            if reply.upload == "refuse":  # answer on the head, then count what comes anyway
                await self._answer(reader, writer, reply, arrival)
                arrival.body = conn.trailing_data[0] + await _watch(reader, REFUSAL_WATCH)
                self.upstream.record(arrival)
                return
            expects = any(n.lower() == b"expect" and v.lower() == b"100-continue"
                          for n, v in arrival.fields)
            if reply.upload == "continue" and expects:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = bytearray()
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    arrival.trailers = list(event.headers.raw_items())
                    break
                else:
                    return  # the peer went away mid-request: nothing to record
            arrival.body = bytes(body)
            leftover = conn.trailing_data[0]
            self.upstream.record(arrival)
            if not await self._answer(reader, writer, reply, arrival):
                return

    @staticmethod
    async def _next(conn: h11.Connection, reader: asyncio.StreamReader):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await asyncio.wait_for(reader.read(65536), IDLE))  # b"": EOF

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Reply,
                      arrival: Arrival) -> bool:
        """Writes the reply; False when the connection is done (a break)."""
        loop = asyncio.get_running_loop()
        for head in reply.interim:
            writer.write(_h1_head(head, []))
        if reply.cut_before_head:
            await _break(reader, writer)
            return False
        no_body = _no_body(arrival.method, reply.head.status)
        writer.write(_h1_head(reply.head, _framing(reply)))
        await writer.drain()
        arrival.head_sent = loop.time()
        if no_body:
            return True
        sent = 0
        for pause, part in reply.chunks:
            if pause:
                await asyncio.sleep(pause)
            writer.write(part if reply.length else b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            sent += len(part)
            arrival.sent.append((loop.time(), sent))
        if reply.cut_after is not None:
            await asyncio.sleep(reply.cut_after)
            await _break(reader, writer)
            return False
        if not reply.length:
            writer.write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in reply.trailers) + b"\r\n")
            await writer.drain()
        return True


def _h1_head(head: Head, framing: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (head.status, head.reason)]
    lines += [n + b": " + v for n, v in (*head.fields, *framing)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _watch(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Whatever arrives within `seconds` or until EOF."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    got = bytearray()
    while (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(reader.read(65536), left)
        except asyncio.TimeoutError:
            break
        if not data:
            break
        got += data
    return bytes(got)


async def _break(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/1.1 break: FIN after what was written (a close with unread input would be a RST,
    which may discard bytes the peer had not read yet), then wait for the peer to close."""
    await writer.drain()
    writer.write_eof()
    await _watch(reader, BREAK_WATCH)


class _H2Upstream(LoopbackTestServer):
    """h2c with prior knowledge, on the `h2` library (no header validation on receipt, so that
    whatever the proxy sends is recorded rather than refused)."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        super().__init__()
        self.upstream = upstream

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        conn = _H2Conn(self.upstream, reader, writer)
        try:
            await conn.run()
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            for child in list(conn.tasks):
                child.cancel()
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()


class _Stream:
    __slots__ = ("arrival", "body", "ended", "answered", "reset")

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self.body = bytearray()
        self.ended = asyncio.Event()  # the request's END_STREAM, or the stream reset
        self.answered = False
        self.reset = False


class _H2Conn:
    def __init__(self, upstream: ScriptedUpstream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False))
        self.streams: dict[int, _Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        self.window = asyncio.Event()  # set whenever send windows may have grown

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.flush()
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), IDLE)
            if not data:
                return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.flush()
                return
            for event in events:
                self.handle(event)
            self.flush()

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            pseudo = {n: v for n, v in event.headers if n.startswith(b":")}
            arrival = Arrival("h2", pseudo.get(b":method", b""), pseudo.get(b":path", b""),
                              pseudo.get(b":authority"), pseudo.get(b":scheme"),
                              [(n, v) for n, v in event.headers if not n.startswith(b":")])
            stream = self.streams[event.stream_id] = _Stream(arrival)
            reply = self.upstream.script(arrival.target)
            if event.stream_ended is not None:
                stream.ended.set()
            if reply.upload == "refuse" or event.stream_ended is not None:
                self.spawn(self.respond(event.stream_id, stream, reply))
                return
            expects = any(n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in arrival.fields)
            if reply.upload == "continue" and expects:
                self.h2.send_headers(event.stream_id, [(b":status", b"100")])
            self.spawn(self.respond(event.stream_id, stream, reply))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.arrival.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset = True
                stream.ended.set()
            self.window.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()

    async def respond(self, stream_id: int, stream: _Stream, reply: Reply) -> None:
        arrival = stream.arrival
        try:
            if reply.upload == "refuse":
                await self.answer(stream_id, stream, reply)
                try:
                    await asyncio.wait_for(stream.ended.wait(), REFUSAL_WATCH)
                except asyncio.TimeoutError:
                    pass
                arrival.body = bytes(stream.body)
                self.upstream.record(arrival)
                return
            await asyncio.wait_for(stream.ended.wait(), IDLE)
            if stream.reset:
                return  # the request never completed: nothing to record or answer
            arrival.body = bytes(stream.body)
            self.upstream.record(arrival)
            await self.answer(stream_id, stream, reply)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, asyncio.TimeoutError):
            pass

    async def answer(self, stream_id: int, stream: _Stream, reply: Reply) -> None:
        loop = asyncio.get_running_loop()
        arrival = stream.arrival
        for head in reply.interim:
            self.h2.send_headers(stream_id, _h2_head(head, []))
        if reply.cut_before_head:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.flush()
            return
        no_body = _no_body(arrival.method, reply.head.status)
        framing = [(b"content-length", v) for n, v in _framing(reply) if n == b"Content-Length"]
        ends_here = no_body or (not reply.chunks and not reply.trailers and reply.cut_after is None)
        self.h2.send_headers(stream_id, _h2_head(reply.head, framing), end_stream=ends_here)
        self.flush()
        arrival.head_sent = loop.time()
        if ends_here:
            return
        sent = 0
        for pause, part in reply.chunks:
            if pause:
                await asyncio.sleep(pause)
            await self.send_data(stream_id, stream, part)
            sent += len(part)
            arrival.sent.append((loop.time(), sent))
        if reply.cut_after is not None:
            await asyncio.sleep(reply.cut_after)
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif reply.trailers:
            self.h2.send_headers(stream_id, h2_legal(reply.trailers), end_stream=True)
        else:
            self.h2.end_stream(stream_id)
        self.flush()

    async def send_data(self, stream_id: int, stream: _Stream, data: bytes) -> None:
        """`data` within the flow-control windows, waiting (bounded) for them to open."""
        view = memoryview(data)
        while view:
            if stream.reset:
                raise h2.exceptions.StreamClosedError(stream_id)
            room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if room <= 0:
                self.window.clear()
                await asyncio.wait_for(self.window.wait(), IDLE)
                continue
            self.h2.send_data(stream_id, bytes(view[:room]))
            view = view[room:]
            self.flush()
            await self.writer.drain()


def _h2_head(head: Head, framing: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(b":status", str(head.status).encode()), *h2_legal(head.fields), *framing]
