"""A tiny verifying h2c upstream: checks each stream's SigV4 with the simulator's independent
verifier (`sigv4proxy.sim.verify`), then forwards it, frame for frame, to a real gRPC server.

Owns: one front h2 server connection and one back h2 client connection per accepted connection,
streams mapped one to one (headers, data, trailers, RST_STREAM both ways), and a record per stream
of what arrived (headers, verdict, request trailers, whether the proxy reset it). Unsigned or
badly signed streams get a 403 (gRPC UNAUTHENTICATED) and are never forwarded.
Must never: bind or connect anywhere but loopback, or outlive its test (`async with`).
Test infrastructure: data is acknowledged as it arrives (small gRPC messages only).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from sigv4proxy.sim.identities import IdentityStore
from sigv4proxy.sim.verify import AuthFailure, RequestView, VerifyContext, verify_request


@dataclass
class ForwardedStream:
    path: str
    headers: list[tuple[str, str]] = field(repr=False)  # carries the token and signature
    principal: str | None = None
    failure: str | None = None
    request_trailers: list[tuple[str, str]] = field(default_factory=list)
    reset_by_proxy: bool = False
    reset_by_backend: bool = False
    response_ended: bool = False

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


@dataclass
class _Pending:
    data: bytearray = field(default_factory=bytearray)
    end: bool = False
    trailers: list | None = None
    finished: bool = False


def _cfg(client: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client, header_encoding=None,
                                     validate_inbound_headers=False, normalize_inbound_headers=False)


class _Side(asyncio.Protocol):
    def __init__(self, relay: _Relay, is_front: bool) -> None:
        self.relay, self.is_front = relay, is_front
        self.h2 = h2.connection.H2Connection(_cfg(client=not is_front))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.relay.close()
            return
        for event in events:
            self.relay.on_event(self, event)
        self.relay.flush()

    def connection_lost(self, exc) -> None:
        self.relay.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class _Relay:
    def __init__(self, server: VerifyingForwarder) -> None:
        self.server = server
        self.front = _Side(self, True)
        self.back = _Side(self, False)
        self.front_to_back: dict[int, int] = {}
        self.back_to_front: dict[int, int] = {}
        self.records: dict[int, ForwardedStream] = {}
        self.pending: dict[tuple[bool, int], _Pending] = {}  # (to_front, stream id) -> queued

    def flush(self) -> None:
        self.front.flush()
        self.back.flush()

    def close(self) -> None:
        for side in (self.front, self.back):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def other(self, side: _Side) -> _Side:
        return self.back if side is self.front else self.front

    def peer_id(self, side: _Side, sid: int) -> int | None:
        return (self.front_to_back if side is self.front else self.back_to_front).get(sid)

    def on_event(self, side: _Side, event) -> None:
        sid = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.RequestReceived):
            self.on_request(event)
            return
        if isinstance(event, h2.events.DataReceived):
            side.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for (to_front, psid) in list(self.pending):
                self.pump(to_front, psid)
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            return
        peer = self.peer_id(side, sid)
        if peer is None:
            return
        other = self.other(side)
        to_front = other is self.front
        record = self.records.get(sid if side is self.front else peer)
        pending = self.pending.setdefault((to_front, peer), _Pending())
        if isinstance(event, h2.events.ResponseReceived):
            other.h2.send_headers(peer, event.headers, end_stream=event.stream_ended is not None)
            if event.stream_ended is not None:
                pending.finished = True
                if record is not None:
                    record.response_ended = True
        elif isinstance(event, h2.events.DataReceived):
            pending.data += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            pending.trailers = list(event.headers)
            if side is self.front and record is not None:
                record.request_trailers = [(n.decode(), v.decode()) for n, v in event.headers]
        elif isinstance(event, h2.events.StreamEnded):
            pending.end = True
            if to_front and record is not None:
                record.response_ended = True
        elif isinstance(event, h2.events.StreamReset):
            if record is not None:
                if side is self.front:
                    record.reset_by_proxy = True
                else:
                    record.reset_by_backend = True
            pending.finished = True
            try:
                other.h2.reset_stream(peer, event.error_code)
            except h2.exceptions.ProtocolError:
                pass
            return
        self.pump(to_front, peer)

    def pump(self, to_front: bool, sid: int) -> None:
        pending = self.pending.get((to_front, sid))
        if pending is None or pending.finished:
            return
        conn = (self.front if to_front else self.back).h2
        try:
            while pending.data:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = bytes(pending.data[:window])
                del pending.data[:window]
                conn.send_data(sid, chunk)
            if pending.trailers is not None:
                conn.send_headers(sid, pending.trailers, end_stream=True)
                pending.finished = True
            elif pending.end:
                conn.end_stream(sid)
                pending.finished = True
        except h2.exceptions.ProtocolError:  # the stream was reset meanwhile
            pending.finished = True

    def on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        fields = [(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                  for n, v in event.headers]
        pseudo = {n: v for n, v in fields if n.startswith(":")}
        headers = [(n.lower(), v) for n, v in fields if not n.startswith(":")]
        headers = [("host", pseudo.get(":authority", ""))] + [h for h in headers if h[0] != "host"]
        path, _, query = pseudo.get(":path", "/").partition("?")
        record = ForwardedStream(path=pseudo.get(":path", ""), headers=headers)
        self.records[sid] = record
        self.server.streams.append(record)
        try:
            verified = verify_request(RequestView(pseudo.get(":method", ""), path, query, headers),
                                      VerifyContext(self.server.identities, self.server.region,
                                                    self.server.service, time.time()))
        except AuthFailure as exc:
            record.failure = exc.exception
            self.front.h2.send_headers(sid, [(b":status", b"403"), (b"content-type", b"application/grpc"),
                                             (b"grpc-status", b"16"), (b"grpc-message", exc.exception.encode())],
                                       end_stream=True)
            return
        record.principal = verified.identity.principal
        bsid = self.back.h2.get_next_available_stream_id()
        self.front_to_back[sid] = bsid
        self.back_to_front[bsid] = sid
        self.back.h2.send_headers(bsid, event.headers, end_stream=event.stream_ended is not None)
        if event.stream_ended is not None:
            self.pending[(False, bsid)] = _Pending(finished=True)


class VerifyingForwarder:
    """`async with VerifyingForwarder(backend_port, identities) as fwd:` then `fwd.port`."""

    def __init__(self, backend_port: int, identities: IdentityStore, *, region: str = "us-west-2",
                 service: str = "vpc-lattice-svcs") -> None:
        self.backend_port = backend_port
        self.identities, self.region, self.service = identities, region, service
        self.streams: list[ForwardedStream] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[_Relay] = set()

    async def __aenter__(self) -> VerifyingForwarder:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for relay in list(self._relays):
            relay.close()
        await self._server.wait_closed()

    def _accept(self) -> asyncio.Protocol:
        relay = _Relay(self)
        self._relays.add(relay)
        loop = asyncio.get_running_loop()

        async def connect_back() -> None:
            # The front is paused until the backend connection exists.
            await loop.create_connection(lambda: relay.back, "127.0.0.1", self.backend_port)
            relay.front.transport.resume_reading()

        class _Front(_Side):
            def connection_made(inner, transport) -> None:  # noqa: N805
                super().connection_made(transport)
                transport.pause_reading()
                task = loop.create_task(connect_back())
                task.add_done_callback(lambda t: (t.cancelled() or t.exception()) and relay.close())

            def connection_lost(inner, exc) -> None:  # noqa: N805
                self._relays.discard(relay)
                relay.close()

        front = _Front(relay, True)
        relay.front = front
        return front
