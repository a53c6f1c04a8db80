"""Clients that record what they saw, for differential tests: an HTTP/1.1 client on a raw socket
(its own strict parser, so no library hides framing) and an h2c client on the `h2` library.

Owns: rendering one request spec for either protocol (HTTP/1.1: cookie crumbs joined as RFC 6265
§5.4 asks of a client; h2c: `differential_upstream.h2_legal`), `Expect: 100-continue` the way curl
does it (the head, then wait for an answer up to a timeout before sending the body), sequential
or pipelined/multiplexed exchanges on one connection, and a `Seen` per response: 1xx heads, head,
body bytes, trailers, how it ended, and loop-time arrival stamps. Must never: wait on a socket without a timeout, or tidy up what arrived
(names keep their case, fields their order and repeats).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from support.differential_upstream import h2_legal

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Request:
    """A request as an HTTP/1.1 client would spell it (Host and framing fields are added)."""

    method: str = "GET"
    target: str = "/"
    fields: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    chunked: bool = False  # HTTP/1.1: chunked (in 3 parts, then `trailers`); h2c: no content-length
    trailers: tuple[tuple[str, str], ...] = ()

    @property
    def expects_continue(self) -> bool:
        return any(n.lower() == "expect" and v.lower() == "100-continue" for n, v in self.fields)


@dataclass
class Interim:
    status: int
    reason: bytes | None  # None over HTTP/2
    fields: list[tuple[bytes, bytes]]


@dataclass
class Seen:
    """One response as the client saw it."""

    interim: list[Interim] = field(default_factory=list)
    version: bytes | None = None  # b"HTTP/1.1"; None over HTTP/2
    status: int | None = None
    reason: bytes | None = None
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # "complete"; after the head, "cut" (HTTP/1.1: EOF before the message's end), "reset" (HTTP/2:
    # RST_STREAM) or "connection closed" (HTTP/2: EOF or GOAWAY); "none" (no final head at all);
    # "stalled" (a read timed out); "malformed: ..." (unparseable framing)
    ending: str = "none"
    body_sent: bool = False  # False when the request had no body or it was held back (Expect)
    started: float = 0.0  # loop time the request head left
    interim_at: list[float] = field(default_factory=list)
    head_at: float | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (loop time, body bytes so far)
    reset_code: int | None = None  # RST_STREAM's error code (HTTP/2)


def _chunks(body: bytes) -> list[bytes]:
    third = max(1, len(body) // 3)
    return [body[i:i + third] for i in range(0, len(body), third)]


# --- HTTP/1.1 -------------------------------------------------------------------------------

def h1_head(request: Request, authority: str) -> bytes:
    lines = [f"{request.method} {request.target} HTTP/1.1", f"Host: {authority}"]
    cookies = [v for n, v in request.fields if n.lower() == "cookie"]
    for name, value in request.fields:
        if name.lower() != "cookie":
            lines.append(f"{name}: {value}")
        elif cookies:
            lines.append(f"{name}: {'; '.join(cookies)}")
            cookies = []
    if request.body is not None:
        lines.append("Transfer-Encoding: chunked" if request.chunked else f"Content-Length: {len(request.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def h1_body(request: Request) -> bytes:
    if request.body is None:
        return b""
    if not request.chunked:
        return request.body
    parts = [b"%x\r\n%s\r\n" % (len(c), c) for c in _chunks(request.body) if c]
    trailers = b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in request.trailers)
    return b"".join(parts) + b"0\r\n" + trailers + b"\r\n"


class _Socket:
    """Buffered reads off one connection, each bounded by `timeout`; `at` is when the latest read
    returned (every body byte is taken out in the parse pass right after the read it came in)."""

    def __init__(self, reader: asyncio.StreamReader, timeout: float) -> None:
        self.reader, self.timeout = reader, timeout
        self.buf = bytearray()
        self.eof = False
        self.at = 0.0

    async def fill(self) -> bool:
        if self.eof:
            return False
        data = await asyncio.wait_for(self.reader.read(65536), self.timeout)
        self.at = asyncio.get_running_loop().time()
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def until(self, marker: bytes) -> bytes | None:
        """Bytes up to and including `marker`; None at EOF first."""
        while (end := self.buf.find(marker)) < 0:
            if not await self.fill():
                return None
        out = bytes(self.buf[:end + len(marker)])
        del self.buf[:end + len(marker)]
        return out

    async def some(self, limit: int) -> bytes | None:
        """1..limit bytes; None at EOF first."""
        if not self.buf and not await self.fill():
            return None
        out = bytes(self.buf[:limit])
        del self.buf[:limit]
        return out


async def h1_exchanges(port: int, requests: tuple[Request, ...], authority: str, *, pipelined: bool = False,
                       expect_timeout: float = 3.0, read_timeout: float = 5.0) -> list[Seen]:
    """Each request on one connection, in turn (or all written at once when `pipelined`)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT)
    sock = _Socket(reader, read_timeout)
    out: list[Seen] = []
    try:
        if pipelined:
            writer.write(b"".join(h1_head(r, authority) + h1_body(r) for r in requests))
            started = loop.time()
            for request in requests:
                seen = Seen(started=started, body_sent=request.body is not None)
                out.append(seen)
                await _read_response(sock, request.method, seen)
                if seen.ending != "complete":
                    break
            return out
        for request in requests:
            seen = Seen()
            out.append(seen)
            writer.write(h1_head(request, authority))
            seen.started = loop.time()
            if request.body is not None:
                if request.expects_continue and await _answered_first(sock, expect_timeout):
                    pass  # a final answer came before the body: curl sends none, and neither do we
                else:
                    writer.write(h1_body(request))
                    seen.body_sent = True
            await _read_response(sock, request.method, seen)
            if seen.ending != "complete" or not seen.body_sent and request.body is not None:
                break
        return out
    finally:
        writer.close()


async def _answered_first(sock: _Socket, timeout: float) -> bool:
    """After a head with `Expect: 100-continue`: True if a final response head came within
    `timeout`; False on a 100 (or any 1xx), on timeout, or at EOF (the body is sent then)."""
    try:
        head = await asyncio.wait_for(_peek_head(sock), timeout)
    except asyncio.TimeoutError:
        return False
    return head is not None and not head[9:10] == b"1"


async def _peek_head(sock: _Socket) -> bytes | None:
    while (end := sock.buf.find(b"\r\n\r\n")) < 0:
        if not await sock.fill():
            return None
    return bytes(sock.buf[:end])


def _parse_head(raw: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    status_line, *lines = raw[:-4].split(b"\r\n")
    version, status, reason = (status_line.split(b" ", 2) + [b""])[:3]
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"header line without a colon: {line[:60]!r}")
        fields.append((name, value.strip(b" \t")))
    return version, int(status), reason, fields


async def _read_response(sock: _Socket, method: str, seen: Seen) -> None:
    try:
        await _read_response_inner(sock, method, seen)
    except asyncio.TimeoutError:
        seen.ending = "stalled"
    except ValueError as exc:
        seen.ending = f"malformed: {exc}"


async def _read_response_inner(sock: _Socket, method: str, seen: Seen) -> None:
    while True:
        raw = await sock.until(b"\r\n\r\n")
        if raw is None:
            seen.ending = "none"
            return
        version, status, reason, fields = _parse_head(raw)
        if 100 <= status < 200:
            seen.interim.append(Interim(status, reason, fields))
            seen.interim_at.append(sock.at)
            continue
        seen.version, seen.status, seen.reason, seen.fields = version, status, reason, fields
        seen.head_at = sock.at
        break
    seen.ending = "cut"  # until the message's end is seen
    if method == "HEAD" or status in (204, 304):
        seen.ending = "complete"
        return
    codings = [v.lower() for n, v in fields if n.lower() == b"transfer-encoding"]
    lengths = [v for n, v in fields if n.lower() == b"content-length"]
    body = bytearray()

    def take(data: bytes) -> None:
        body.extend(data)
        seen.body = bytes(body)
        seen.arrivals.append((sock.at, len(body)))

    if codings:
        if not codings[-1].endswith(b"chunked"):
            raise ValueError("a transfer coding other than chunked last")
        while True:
            line = await sock.until(b"\r\n")
            if line is None:
                return
            size = int(line[:-2].split(b";")[0].strip(), 16)
            if size == 0:
                break
            while size:
                data = await sock.some(size)
                if data is None:
                    return
                take(data)
                size -= len(data)
            if await sock.until(b"\r\n") != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
        while (line := await sock.until(b"\r\n")) not in (b"\r\n", None):
            name, _, value = line[:-2].partition(b":")
            seen.trailers.append((name, value.strip(b" \t")))
        if line is not None:
            seen.ending = "complete"
    elif lengths:
        if len(set(lengths)) != 1:
            raise ValueError("conflicting Content-Length fields")
        left = int(lengths[0])
        while left:
            data = await sock.some(left)
            if data is None:
                return
            take(data)
            left -= len(data)
        seen.ending = "complete"
    else:  # delimited by the close
        while (data := await sock.some(65536)) is not None:
            take(data)
        seen.ending = "complete"


# --- h2c ------------------------------------------------------------------------------------

def h2_fields(request: Request, authority: str) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", request.method.encode()), (b":scheme", b"http"),
              (b":authority", authority.encode()), (b":path", request.target.encode("latin-1"))]
    fields += h2_legal([(n.encode("latin-1"), v.encode("latin-1")) for n, v in request.fields])
    if request.body is not None and not request.chunked:
        fields.append((b"content-length", str(len(request.body)).encode()))
    return fields


class _H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_timeout: float) -> None:
        self.reader, self.writer, self.read_timeout = reader, writer, read_timeout
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False))
        self.seen: dict[int, Seen] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.changed = asyncio.Event()  # a head arrived or a window opened
        self.closed = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def finish(self, stream_id: int, ending: str) -> None:
        seen = self.seen.get(stream_id)
        if seen is not None and not self.done[stream_id].is_set():
            seen.ending = ending if seen.status is not None or ending in ("stalled", "complete") \
                or ending.startswith("malformed") else "none"
            self.done[stream_id].set()
        self.changed.set()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        ending = "connection closed"
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), self.read_timeout)
                if not data:
                    break
                now = loop.time()
                for event in self.h2.receive_data(data):
                    self.handle(event, now)
                self.flush()
        except asyncio.TimeoutError:
            ending = "stalled"
        except h2.exceptions.ProtocolError as exc:
            ending = f"malformed: {type(exc).__name__}: {exc}"
        except (ConnectionError, OSError):
            pass
        self.closed = True
        for stream_id in self.seen:
            self.finish(stream_id, ending)

    def handle(self, event: h2.events.Event, now: float) -> None:
        sid = getattr(event, "stream_id", 0)
        seen = self.seen.get(sid)
        if isinstance(event, h2.events.InformationalResponseReceived) and seen is not None:
            status, fields = _split_status(event.headers)
            seen.interim.append(Interim(status, None, fields))
            seen.interim_at.append(now)
            self.changed.set()
        elif isinstance(event, h2.events.ResponseReceived) and seen is not None:
            seen.status, seen.fields = _split_status(event.headers)
            seen.head_at = now
            self.changed.set()
        elif isinstance(event, h2.events.DataReceived):
            if seen is not None:
                seen.body += event.data
                seen.arrivals.append((now, len(seen.body)))
            try:
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            except h2.exceptions.StreamClosedError:
                pass
        elif isinstance(event, h2.events.TrailersReceived) and seen is not None:
            seen.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self.finish(sid, "complete")
        elif isinstance(event, h2.events.StreamReset):
            if seen is not None:
                seen.reset_code = int(event.error_code)
            self.finish(sid, "reset")
        elif isinstance(event, h2.events.ConnectionTerminated):
            for stream_id in self.seen:
                if stream_id > event.last_stream_id:
                    self.finish(stream_id, "connection closed")
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.changed.set()

    async def wait_changed(self) -> None:
        self.changed.clear()
        await asyncio.wait_for(self.changed.wait(), self.read_timeout)

    async def exchange(self, request: Request, authority: str, expect_timeout: float) -> Seen:
        loop = asyncio.get_running_loop()
        sid = self.h2.get_next_available_stream_id()
        seen = self.seen[sid] = Seen()
        self.done[sid] = asyncio.Event()
        self.h2.send_headers(sid, h2_fields(request, authority), end_stream=request.body is None)
        self.flush()
        seen.started = loop.time()
        try:
            if request.body is not None:
                if request.expects_continue and await self._answered_first(sid, seen, expect_timeout):
                    # A final answer came first: the body is never sent; once the answer is in,
                    # our half of the stream is cancelled.
                    await asyncio.wait_for(self.done[sid].wait(), self.read_timeout)
                    self._cancel(sid)
                else:
                    await self._send_body(sid, request)
                    seen.body_sent = True
            await asyncio.wait_for(self.done[sid].wait(), self.read_timeout)
        except asyncio.TimeoutError:
            self.finish(sid, "stalled")
        except h2.exceptions.StreamClosedError:
            await asyncio.wait_for(self.done[sid].wait(), self.read_timeout)
        return seen

    async def _answered_first(self, sid: int, seen: Seen, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not seen.interim and seen.status is None and not self.done[sid].is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return False
        return seen.status is not None or self.done[sid].is_set()

    def _cancel(self, sid: int) -> None:
        try:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass
        self.flush()

    async def _send_body(self, sid: int, request: Request) -> None:
        assert request.body is not None
        view = memoryview(request.body)
        while view:
            if self.done[sid].is_set():
                return  # answered (or reset) meanwhile
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if room <= 0:
                await self.wait_changed()
                continue
            self.h2.send_data(sid, bytes(view[:room]))
            view = view[room:]
            self.flush()
            await self.writer.drain()
        if request.trailers:
            self.h2.send_headers(sid, [(n.lower().encode(), v.encode()) for n, v in request.trailers],
                                 end_stream=True)
        else:
            self.h2.end_stream(sid)
        self.flush()


def _split_status(headers) -> tuple[int, list[tuple[bytes, bytes]]]:
    status = next((int(v) for n, v in headers if n == b":status"), 0)
    return status, [(n, v) for n, v in headers if not n.startswith(b":")]


async def h2_exchanges(port: int, requests: tuple[Request, ...], authority: str, *, concurrent: bool = False,
                       expect_timeout: float = 3.0, read_timeout: float = 5.0) -> list[Seen]:
    """Each request on its own stream of one h2c connection, in turn (or all at once)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT)
    client = _H2Client(reader, writer, read_timeout)
    client.h2.initiate_connection()
    client.flush()
    reading = asyncio.get_running_loop().create_task(client.read_loop())
    try:
        if concurrent:
            return list(await asyncio.gather(*(client.exchange(r, authority, expect_timeout) for r in requests)))
        out = []
        for request in requests:
            out.append(await client.exchange(request, authority, expect_timeout))
            if client.closed:
                break
        return out
    finally:
        reading.cancel()
        writer.close()
