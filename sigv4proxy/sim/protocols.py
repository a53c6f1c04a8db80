"""HTTP/1.1 (h11) and HTTP/2 (h2, server side) handlers for the simulator's connections.

Owns: translating wire events into `sim.app` exchanges and `ResponsePlan`s back into frames,
with HTTP/2 flow control (request data acknowledged as it is hashed; response data sent only
within the peer's windows) and write backpressure (`Connection.drain`); and how each protocol
retires a connection at one of Lattice's limits (`retire`): HTTP/1.1 closes an idle socket at
once (a request already on its way meets a closed connection, as at Lattice) or ends the response
in progress with `Connection: close`; HTTP/2 sends GOAWAY naming the last stream it took, refuses
newer ones and closes once the streams it took have finished.
Must never: buffer a whole body, or let an h11/h2 protocol error escape as a crash: a broken peer
gets a 400 (HTTP/1.1) or a GOAWAY/RST (HTTP/2) and the connection is closed.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
from hyperframe.frame import GoAwayFrame

from sigv4proxy.sim.app import Exchange, ResponsePlan

if TYPE_CHECKING:
    from sigv4proxy.sim.server import Connection

_ENC = ("utf-8", "surrogateescape")  # keep the exact bytes for SigV4
_HOP_BY_HOP = frozenset({"connection", "transfer-encoding", "keep-alive", "upgrade", "proxy-connection"})


def _reason(status: int) -> bytes:
    """The registered reason phrase, as Lattice's HTTP/1.1 listeners send it (h11 sends none)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _s(b: bytes) -> str:
    return b.decode(*_ENC)


def _strip_absolute_form(target: str) -> str:
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return target


class H1Handler:
    protocol = "HTTP/1.1"

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.SERVER)
        self.exchange: Exchange | None = None
        self.responding = False
        self.close_after = False  # retiring: the response in progress is the last

    def data_received(self, data: bytes) -> None:
        self.conn.touch()  # bytes of a request: not idle
        self.h11.receive_data(data)
        self._process()

    def connection_lost(self) -> None:
        pass

    def busy(self) -> bool:
        return self.exchange is not None or self.responding

    def retire(self) -> None:
        if self.busy():
            self.close_after = True
        else:
            self.conn.close()

    def _process(self) -> None:
        while not self.responding:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc.error_status_hint)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                headers = [(_s(n), _s(v)) for n, v in event.headers.raw_items()]
                headers = [(n.lower(), v) for n, v in headers]
                authority = next((v for n, v in headers if n == "host"), None)
                target = _strip_absolute_form(_s(event.target))
                head = self.conn.head("HTTP/1.1", _s(event.method), target, authority, headers)
                self.exchange = self.conn.server.app.begin(head)
                if self.h11.they_are_waiting_for_100_continue:
                    self.conn.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                if self.exchange is not None:
                    self.exchange.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.responding = True
                if self.conn.transport is not None:
                    self.conn.transport.pause_reading()  # no pipelined request is read meanwhile
                self.conn.spawn(self._respond())
            elif isinstance(event, h11.ConnectionClosed):
                self.conn.close()
                return

    def _bad_request(self, status: int) -> None:
        self.conn.write(f"HTTP/1.1 {status} Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        self.conn.close()

    async def _respond(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        plan = await exchange.respond()
        head_only = exchange.head.method == "HEAD"
        length = plan.stream_bytes if plan.stream_bytes is not None else len(plan.body)
        headers = [(n, v) for n, v in plan.headers if n not in _HOP_BY_HOP]
        headers.append(("content-length", str(length)))
        if self.close_after:
            headers.append(("connection", "close"))  # h11 then closes after this response
        sent, first_byte_at = 0, None
        try:
            self.conn.write(
                self.h11.send(h11.Response(status_code=plan.status, headers=headers, reason=_reason(plan.status)))
            )
            first_byte_at = time.time()
            if not head_only:
                for chunk in plan.chunks():
                    self.conn.write(self.h11.send(h11.Data(data=chunk)))
                    sent += len(chunk)
                    await self.conn.drain()
            self.conn.write(self.h11.send(h11.EndOfMessage()))
        except (ConnectionError, h11.LocalProtocolError) as exc:
            exchange.finish(plan.status, sent, type(exc).__name__, first_byte_at)
            self.conn.close()
            return
        exchange.finish(plan.status, sent, None, first_byte_at)
        self.exchange = None
        if self.close_after or self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
            self.conn.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.conn.close()
            return
        self.responding = False
        self.conn.touch()
        if self.conn.transport is not None and not self.conn.transport.is_closing():
            self.conn.transport.resume_reading()
        self._process()


class H2Handler:
    protocol = "HTTP/2"

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.exchanges: dict[int, Exchange] = {}
        self.window_open: dict[int, asyncio.Event] = {}
        self.last_stream_id = 0  # the newest stream taken: what a GOAWAY names
        self.going_away = False
        self.h2.initiate_connection()
        self._flush()

    def busy(self) -> bool:
        return bool(self.exchanges)

    def retire(self) -> None:
        # A GOAWAY frame of our own: h2's close_connection() would also stop the streams we took.
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream_id
        self.conn.write(frame.serialize())
        self.going_away = True
        self._finish_going_away()

    def _finish_going_away(self) -> None:
        if self.going_away and not self.exchanges:
            self._flush()
            self.conn.close()

    def _stream_done(self, stream_id: int) -> None:
        self.exchanges.pop(stream_id, None)
        self.conn.touch()
        self._finish_going_away()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.conn.write(data)

    def connection_lost(self) -> None:
        for event in self.window_open.values():
            event.set()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2 queued a GOAWAY
            self.conn.close()
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self.going_away and event.stream_id > self.last_stream_id:
                # Above the GOAWAY's last stream: never processed, so the client may retry it.
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self._request(event.stream_id, event.headers)
            if event.stream_ended is not None:
                self._ended(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.feed(event.data)
            # Hashing is synchronous, so the window is reopened right away: no buffering here.
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if event.stream_ended is not None:
                self._ended(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._ended(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._wake(event.stream_id)
            self._stream_done(event.stream_id)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake(getattr(event, "stream_id", 0) or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.conn.close()

    def _wake(self, stream_id: int) -> None:
        targets = self.window_open.values() if stream_id == 0 else [self.window_open.get(stream_id)]
        for ev in targets:
            if ev is not None:
                ev.set()

    def _request(self, stream_id: int, raw: list[tuple[bytes, bytes]]) -> None:
        pseudo: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        for name, value in raw:
            n, v = _s(name), _s(value)
            if n.startswith(":"):
                pseudo[n] = v
            else:
                headers.append((n.lower(), v))
        authority = pseudo.get(":authority")
        if authority is not None:
            headers = [("host", authority)] + [(n, v) for n, v in headers if n != "host"]
        else:
            authority = next((v for n, v in headers if n == "host"), None)
        head = self.conn.head("HTTP/2", pseudo.get(":method", ""), pseudo.get(":path", "/"), authority, headers)
        self.exchanges[stream_id] = self.conn.server.app.begin(head)
        self.last_stream_id = max(self.last_stream_id, stream_id)

    def _ended(self, stream_id: int) -> None:
        exchange = self.exchanges.get(stream_id)
        if exchange is not None and stream_id not in self.window_open:
            self.window_open[stream_id] = asyncio.Event()
            self.conn.spawn(self._respond(stream_id, exchange))

    async def _respond(self, stream_id: int, exchange: Exchange) -> None:
        sent, first_byte_at, failure = 0, None, None
        plan: ResponsePlan | None = None
        try:
            plan = await exchange.respond()
            head_only = exchange.head.method == "HEAD"
            length = plan.stream_bytes if plan.stream_bytes is not None else len(plan.body)
            headers = [
                (":status", str(plan.status)),
                *((n, v) for n, v in plan.headers if n not in _HOP_BY_HOP),
                ("content-length", str(length)),
            ]
            no_body = head_only or length == 0
            self.h2.send_headers(stream_id, headers, end_stream=no_body and not plan.trailers)
            self._flush()
            first_byte_at = time.time()
            if not no_body:
                for chunk in plan.chunks():
                    sent += await self._send_data(stream_id, chunk)
            if plan.trailers:
                self.h2.send_headers(stream_id, plan.trailers, end_stream=True)
            elif not no_body:
                self.h2.end_stream(stream_id)
            self._flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError) as exc:
            failure = type(exc).__name__
        finally:
            self.window_open.pop(stream_id, None)
            if plan is not None:
                exchange.finish(plan.status, sent, failure, first_byte_at)
            self._stream_done(stream_id)

    async def _send_data(self, stream_id: int, chunk: bytes) -> int:
        view, offset = memoryview(chunk), 0
        while offset < len(chunk):
            if self.conn.closed.is_set():
                raise ConnectionResetError("peer went away")
            if stream_id not in self.exchanges:
                raise h2.exceptions.StreamClosedError(stream_id)
            window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                event = self.window_open[stream_id]
                event.clear()
                await event.wait()
                continue
            n = min(window, len(chunk) - offset)
            self.h2.send_data(stream_id, bytes(view[offset : offset + n]))
            self._flush()
            offset += n
            await self.conn.drain()
        return offset
