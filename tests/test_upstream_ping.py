"""Liveness PING on idle pooled HTTP/2 connections (both client implementations): a live peer
keeps its connection (and answers our PINGs); a peer that stops answering is dropped from the
pool before a request could be sent into it."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import pytest

from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.http2 import H2Connection
from sigv4proxy.upstream.lean_h2 import LeanH2Connection
from sigv4proxy.upstream.pool import ConnectionPool
from support.polling import eventually

IMPLEMENTATIONS = [H2Connection, LeanH2Connection]


class PingPeer:
    """An h2c server that answers requests with 200 and counts PINGs; with `answer_pings=False`
    it goes silent (sends nothing more, PING ACKs included) once the first PING arrives."""

    def __init__(self, answer_pings: bool) -> None:
        self.answer_pings = answer_pings
        self.pings = 0
        self.connections = 0
        self.closed = 0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.PingReceived):
                        self.pings += 1
                    elif isinstance(event, h2.events.RequestReceived):
                        conn.send_headers(event.stream_id, [(b":status", b"200")], end_stream=True)
                out = conn.data_to_send()
                if self.answer_pings or not self.pings:
                    writer.write(out)
        finally:
            self.closed += 1
            writer.close()

    async def __aenter__(self) -> PingPeer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()


def h2_connections(pool: ConnectionPool) -> int:
    return sum(n for (proto, _), n in pool.stats().connections.items() if proto == "h2")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda c: c.__name__)
async def test_idle_connection_is_pinged_and_kept_while_the_peer_answers(impl):
    async with PingPeer(answer_pings=True) as peer:
        pool = ConnectionPool(timeouts=Timeouts(ping=0.2, connect=1.0), h2_connection_factory=impl)
        origin = Origin("http", "127.0.0.1", peer.port, "h2")
        try:
            resp = await pool.request(origin, b"GET", b"/a", b"svc.example", [])
            await resp.aclose()
            assert await eventually(lambda: peer.pings >= 3)
            assert h2_connections(pool) == 1 and peer.closed == 0
            resp = await pool.request(origin, b"GET", b"/b", b"svc.example", [])
            assert resp.status == 200
            await resp.aclose()
            assert peer.connections == 1  # the same, still-live connection was reused
        finally:
            await pool.aclose()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda c: c.__name__)
async def test_a_peer_that_stops_answering_pings_is_dropped_from_the_pool(impl):
    async with PingPeer(answer_pings=False) as peer:
        pool = ConnectionPool(timeouts=Timeouts(ping=0.2, connect=0.4), h2_connection_factory=impl)
        origin = Origin("http", "127.0.0.1", peer.port, "h2")
        try:
            resp = await pool.request(origin, b"GET", b"/a", b"svc.example", [])
            await resp.aclose()
            assert await eventually(lambda: peer.pings >= 1)
            assert await eventually(lambda: h2_connections(pool) == 0 and peer.closed == 1)
        finally:
            await pool.aclose()


async def test_ping_can_be_turned_off():
    async with PingPeer(answer_pings=True) as peer:
        pool = ConnectionPool(timeouts=Timeouts(ping=0), h2_connection_factory=LeanH2Connection)
        try:
            resp = await pool.request(Origin("http", "127.0.0.1", peer.port, "h2"), b"GET", b"/", b"s.example", [])
            await resp.aclose()
            await asyncio.sleep(0.5)
            assert peer.pings == 0
        finally:
            await pool.aclose()
