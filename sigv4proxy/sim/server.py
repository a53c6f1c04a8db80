"""The simulator's listener: one port for HTTP/1.1 (h11), h2c (prior knowledge) and TLS (ALPN).

Owns: sockets, protocol sniffing (the 24-byte HTTP/2 preface), the h11/h2 state machines, flow
control and write backpressure, Lattice's connection limits (an idle close, 60 s by default, and a
maximum connection age, 600 s; each connection asks its protocol handler to retire, and the closes
are counted by protocol and reason in `SimServer.closes`), and the server's lifecycle
(`start_simulator`, `SimServer.aclose`).
Request semantics live in `sim.app`; this module only moves bytes and events.
Must never: buffer a whole body (data is hashed as it arrives and acknowledged to the peer),
leave a task or a connection behind after `aclose()`, or log header values.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from sigv4proxy.sim import DEFAULT_NETWORK_ARN, DEFAULT_SERVICE_ARN, URI_PATH_ESCAPINGS  # noqa: F401 (re-exported)
from sigv4proxy.sim.accesslog import AccessLogSink
from sigv4proxy.sim.app import RequestHead, SimApp, TlsInfo
from sigv4proxy.sim.identities import IdentityStore
from sigv4proxy.sim.policy import Policy
from sigv4proxy.sim.protocols import H1Handler, H2Handler

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    identities: str | pathlib.Path | Mapping[str, Any] | IdentityStore | None = None
    policy: str | pathlib.Path | Mapping[str, Any] | Policy | None = None  # None: allow all authenticated
    service_arn: str = DEFAULT_SERVICE_ARN
    service_network_arn: str = DEFAULT_NETWORK_ARN
    region: str = "us-west-2"
    service: str = "vpc-lattice-svcs"
    uri_path_escaping: str = "double"  # or "single": the canonical URI is the path as it arrived
    tls_cert: str | pathlib.Path | None = None
    tls_key: str | pathlib.Path | None = None
    access_log: str | pathlib.Path | TextIO | None = None  # path, "-" for stdout, or a stream
    clock: Callable[[], float] = time.time
    require_auth: bool = True
    max_records: int = 10_000
    # Lattice closes a connection with no request in flight for 60 s (60-600 s, set by the
    # service owner) and any connection after 10 minutes. Seconds; 0 turns a limit off.
    idle_timeout: float = 60.0
    max_connection_age: float = 600.0


class Connection(asyncio.Protocol):
    """One accepted connection: sniffs the protocol, then hands bytes to the h11 or h2 handler."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.handler: H1Handler | H2Handler | None = None
        self._sniffed = b""
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.retiring: str | None = None  # the limit that is closing this connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._age_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.server.accepted += 1
        loop = self._loop = asyncio.get_running_loop()
        self._idle_since = loop.time()
        cfg = self.server.cfg
        if cfg.max_connection_age > 0:
            self._age_timer = loop.call_later(cfg.max_connection_age, self._limit_reached, "max_age")
        if cfg.idle_timeout > 0:
            self._idle_timer = loop.call_later(cfg.idle_timeout, self._idle_check)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            self._start(H2Handler)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            self._sniffed += data
            n = min(len(self._sniffed), len(H2_PREFACE))
            if self._sniffed[:n] != H2_PREFACE[:n]:
                self._start(H1Handler)
            elif n == len(H2_PREFACE):
                self._start(H2Handler)
            else:
                return
            data, self._sniffed = self._sniffed, b""
        assert self.handler is not None
        self.handler.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._cancel_timers()
        self._can_write.set()
        self.closed.set()
        if self.handler is not None:
            self.handler.connection_lost()
        for task in list(self.tasks):
            task.cancel()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- used by the handlers ---
    def _start(self, handler_cls: type) -> None:
        self.handler = handler_cls(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        await self._can_write.wait()
        if self.closed.is_set():
            raise ConnectionResetError("peer went away")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- Lattice's connection limits ---
    def touch(self) -> None:
        """The handler saw request activity end (or begin): the idle clock starts again from now."""
        if self._loop is None or self.closed.is_set():
            return
        self._idle_since = self._loop.time()
        idle = self.server.cfg.idle_timeout
        if self._idle_timer is None and idle > 0 and self.retiring is None:
            self._idle_timer = self._loop.call_at(self._idle_since + idle, self._idle_check)

    def _idle_check(self) -> None:
        # One lazy timer: activity only moves `_idle_since`; the timer re-arms itself from it.
        self._idle_timer = None
        if self.retiring is not None or self.closed.is_set() or self._loop is None:
            return
        if self.handler is not None and self.handler.busy():
            return  # the handler's `touch()` when the request ends starts the clock again
        due = self._idle_since + self.server.cfg.idle_timeout
        if self._loop.time() >= due:
            self._limit_reached("idle")
        else:
            self._idle_timer = self._loop.call_at(due, self._idle_check)

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._age_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._age_timer = None

    def _limit_reached(self, reason: str) -> None:
        if self.retiring is not None or self.closed.is_set():
            return
        self.retiring = reason
        self._cancel_timers()
        protocol = self.handler.protocol if self.handler is not None else "none"
        self.server.closes[(protocol, reason)] += 1
        if self.handler is None:
            self.close()
        else:
            self.handler.retire()

    def head(
        self, protocol: str, method: str, target: str, authority: str | None, headers: list[tuple[str, str]]
    ) -> RequestHead:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername") or ("-", 0)
        sock = self.transport.get_extra_info("sockname") or ("-", 0)
        sslobj = self.transport.get_extra_info("ssl_object")
        tls = TlsInfo(sslobj.cipher()[0], sslobj.version()) if sslobj is not None else None
        return RequestHead(protocol, method, target, authority, headers, (peer[0], peer[1]), sock[1], tls)


class SimServer:
    """A running simulator. Use `await start_simulator(cfg)`; stop with `await aclose()`."""

    def __init__(self, cfg: SimConfig, app: SimApp) -> None:
        self.cfg = cfg
        self.app = app
        self.connections: set[Connection] = set()
        # Connections closed at a limit: (protocol "HTTP/1.1" | "HTTP/2" | "none", reason
        # "idle" | "max_age") -> count. "none": no request byte had arrived to tell the protocol.
        self.closes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.accepted = 0  # connections accepted so far (how often clients connected)
        self._server: asyncio.base_events.Server | None = None

    @property
    def host(self) -> str:
        return self.cfg.host

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def records(self) -> list[dict[str, Any]]:
        """A snapshot of the last access-log records (at most `max_records`), oldest first."""
        return list(self.app.log.records)

    def close_counts(self) -> dict[str, dict[str, int]]:
        """`closes` as {protocol: {reason: count}}, for reports and JSON."""
        out: dict[str, dict[str, int]] = {}
        for (protocol, reason), count in sorted(self.closes.items()):
            out.setdefault(protocol, {})[reason] = count
        return out

    async def _listen(self, ssl_ctx: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), self.cfg.host, self.cfg.port, ssl=ssl_ctx)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.closed.wait()) for c in conns], timeout=5)
        tasks = [t for c in conns for t in c.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self.app.log.close()

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def tls_context(cert: str | pathlib.Path, key: str | pathlib.Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def build_app(cfg: SimConfig) -> SimApp:
    if cfg.uri_path_escaping not in URI_PATH_ESCAPINGS:
        raise ValueError(
            f"uri_path_escaping must be one of {', '.join(URI_PATH_ESCAPINGS)}; got {cfg.uri_path_escaping!r}"
        )
    return SimApp(
        identities=IdentityStore.load(cfg.identities),
        policy=Policy.load(cfg.policy) if cfg.policy is not None else None,
        service_arn=cfg.service_arn,
        service_network_arn=cfg.service_network_arn,
        region=cfg.region,
        service=cfg.service,
        require_auth=cfg.require_auth,
        clock=cfg.clock,
        log=AccessLogSink.open(cfg.access_log, cfg.max_records),
        double_encode_path=cfg.uri_path_escaping == "double",
    )


async def start_simulator(cfg: SimConfig) -> SimServer:
    """Loads identities and policy (raising IdentitiesError/PolicyError on bad input) and listens."""
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    for name in ("idle_timeout", "max_connection_age"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be 0 (off) or a positive number of seconds")
    ssl_ctx = tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
    server = SimServer(cfg, build_app(cfg))
    try:
        await server._listen(ssl_ctx)
    except BaseException:
        server.app.log.close()
        raise
    return server
