"""One worker's proxy: builds the parts from the config, runs the listeners, drains on stop.

Owns: start-up order (credentials, pool, admin, one listener per listen address), readiness, and
graceful drain. Must never: start accepting before it can sign, drop an in-flight request while
draining, or leave a socket bound when start-up fails.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from sigv4proxy.aws.credentials import CredentialStore
from sigv4proxy.aws.routing import Router, timeouts_from_config
from sigv4proxy.compat.aiohttp import InboundServer
from sigv4proxy.config import ProxyConfig, hostport
from sigv4proxy.exchange.exchange import Exchange, ExchangeSettings
from sigv4proxy.exchange.prepare import HeaderRules, RequestPreparer
from sigv4proxy.inbound.h1 import H1Handler
from sigv4proxy.inbound.listener import InboundListener
from sigv4proxy.inbound.settings import InboundSettings
from sigv4proxy.limits import MAX_HEADER_FIELD, MAX_HEADERS, MAX_REQUEST_LINE
from sigv4proxy.model import Origin, PoolLimits, Timeouts
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.runtime.admin import AdminHandler
from sigv4proxy.upstream.lean_h2 import LeanH2Connection
from sigv4proxy.upstream.pool import ConnectionPool
from sigv4proxy.upstream.tls import make_client_ssl_context

if TYPE_CHECKING:  # httptools loads only where the lean HTTP/1.1 server is chosen
    from sigv4proxy.inbound.h1_lean import LeanH1Server

log = logging.getLogger("sigv4proxy")
# Gauges copied and (with workers) batched histograms flushed this often: how late a scrape may
# see another worker's requests.
METRICS_INTERVAL = 0.5


def credentials_from_config(config: ProxyConfig) -> CredentialStore:
    return CredentialStore.from_config(config)


def pool_from_config(
    config: ProxyConfig,
    origin_timeouts: Mapping[Origin, Timeouts] | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> ConnectionPool:
    """`origin_timeouts`: per-origin overrides from routes (`Router.origin_timeouts()`);
    `on_retry(reason)`: each upstream retry (the metric)."""
    return ConnectionPool(
        # One TLS context per ALPN offer, so an http1-only origin never offers h2.
        ssl_context_factory=lambda alpn: make_client_ssl_context(config.ca_bundle, verify=config.verify_tls, alpn=alpn),
        timeouts=timeouts_from_config(config),
        limits=PoolLimits(max_connections_per_origin=config.max_connections),
        origin_timeouts=origin_timeouts,
        # Both pass the same upstream tests; the lean one costs far less CPU per request
        # (docs/performance.md).
        h2_connection_factory=LeanH2Connection if config.h2_implementation == "lean" else None,  # None: h2
        on_retry=on_retry,
    )


class ListenError(OSError):
    """A listen or admin address could not be bound; the message names it."""


def _bind(host: str, port: int, reuse_port: bool, recv_buffer: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One family per socket: [::] takes no IPv4, so it binds beside 0.0.0.0 on one port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if recv_buffer:
            # Accepted sockets inherit it. The event loop reads up to 256 KiB at a time, and a read
            # lands in memory before backpressure can pause the socket: with many uploads at once
            # that overshoot, not the body buffers, sets peak RSS. The peer is local, so a small
            # window costs no throughput.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _host_lacks_ipv6(host: str, exc: OSError) -> bool:
    """The bind failed because this host has no IPv6 at all (IPv6 off at boot, or no ::1 on lo):
    then no client here can reach that listener either."""
    if ":" not in host:
        return False
    if exc.errno == errno.EAFNOSUPPORT:
        return True
    return exc.errno == errno.EADDRNOTAVAIL and ipaddress.IPv6Address(host).is_loopback


def _bind_listeners(
    addresses: Sequence[tuple[str, int]], reuse_port: bool, recv_buffer: int | None
) -> list[socket.socket]:
    """A listening socket per address. An IPv6 one on a host without IPv6 is skipped with a
    warning; any other failure, or nothing left to listen on, is a ListenError (the sockets bound
    so far are closed)."""
    socks: list[socket.socket] = []
    try:
        for host, port in addresses:
            try:
                socks.append(_bind(host, port, reuse_port, recv_buffer))
            except OSError as exc:
                if not _host_lacks_ipv6(host, exc):
                    raise ListenError(exc.errno, f"cannot listen on {hostport(host, port)}: {exc.strerror}") from None
                log.warning(
                    "IPv6 listener skipped: this host has no IPv6",
                    extra={"listen": hostport(host, port), "reason": exc.strerror},
                )
        if not socks:
            raise ListenError(errno.EADDRNOTAVAIL, "no listen address could be bound")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class ProxyApp:
    """A running proxy worker. `start()`, then `port`/`admin_port`; `stop()` drains and closes."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        credentials: CredentialStore | None = None,
        pool: ConnectionPool | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.credentials = credentials or credentials_from_config(config)
        self.router = Router(config)
        self.metrics = metrics or Metrics()
        self.pool = pool or pool_from_config(config, self.router.origin_timeouts(), self.metrics.on_upstream_retry)
        self.credentials.on_refresh = self.metrics.on_credential_refresh
        # One request path for both inbound protocols, built from typed settings derived once.
        self.exchange = Exchange(
            RequestPreparer(
                self.router,
                self.credentials,
                HeaderRules.from_options(
                    config.max_body_size, config.strip_header, config.add_header, config.duplicate_header
                ),
            ),
            self.pool,
            self.metrics,
            ExchangeSettings(max_inflight=config.max_inflight, access_log=config.access_log),
        )
        self.inbound_settings = InboundSettings(
            max_body_size=config.max_body_size,
            read_timeout=config.read_timeout,
            splice=config.splice,
            transparent=config.transparent,
        )
        # HTTP/1.1: our own protocol over llhttp, or aiohttp's server (the reference); both pass
        # the same inbound tests.
        self.handler: H1Handler | LeanH1Server
        if config.h1_implementation == "lean":
            from sigv4proxy.inbound.h1_lean import LeanH1Server

            self.handler = LeanH1Server(
                self.exchange, self.inbound_settings, time.time, head_timeout=config.header_timeout
            )
        else:
            self.handler = H1Handler(self.exchange, self.inbound_settings, time.time)
        # HTTP/2 (h2c prior knowledge, gRPC) on the same port, through the same exchange.
        # Built at the first h2c connection: the h2 library's memory is something an HTTP/1.1-only
        # sidecar never needs (docs/performance.md).
        self._h2_streams = None
        # No bytes either way on an HTTP/2 stream for this long cuts it (long RPCs stay up).
        self.stream_idle_timeout = config.stream_idle_timeout
        self._listener: InboundListener | None = None
        self._reuse_port = reuse_port
        self._draining = False
        self._proxy_servers: list[asyncio.AbstractServer] = []
        self._admin_listener: asyncio.AbstractServer | None = None
        self._web_server: InboundServer | LeanH1Server | None = None
        self._admin_server: web.Server | None = None
        self._gauge_task: asyncio.Task | None = None
        self.addresses: list[tuple[str, int]] = []  # (host, port) of every listener, as bound
        self.port = 0  # the first listener's
        self.admin_port = 0

    # --- readiness ---
    def readiness(self) -> tuple[bool, str]:
        if self._draining:
            return False, "draining"
        if not self._proxy_servers or not all(s.is_serving() for s in self._proxy_servers):
            return False, "listener not started"
        return self.credentials.ready()

    def refresh_gauges(self) -> None:
        self.metrics.update_gauges(self.credentials.expiry, self.pool.stats(), self.exchange.inflight)

    async def _gauge_loop(self) -> None:
        while True:
            self.refresh_gauges()
            self.metrics.flush()
            await asyncio.sleep(METRICS_INTERVAL)

    # --- lifecycle ---
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.credentials.start()
        admin_host, admin_port = self.config.admin_addr
        try:
            admin_sock = _bind(admin_host, admin_port, self._reuse_port)
        except OSError as exc:
            raise ListenError(
                exc.errno, f"cannot listen on admin {hostport(admin_host, admin_port)}: {exc.strerror}"
            ) from None
        try:
            socks = _bind_listeners(self.config.listen_addrs, self._reuse_port, self.config.recv_buffer)
        except ListenError:
            admin_sock.close()
            raise
        self._admin_server = web.Server(
            AdminHandler(self.metrics, self.readiness, self.refresh_gauges), access_log=None
        )
        self._admin_listener = await loop.create_server(self._admin_server, sock=admin_sock)
        self.admin_port = admin_sock.getsockname()[1]
        if isinstance(self.handler, H1Handler):
            self._web_server = InboundServer(
                self.handler,  # type: ignore[arg-type]  # answers it wrote itself are WrittenResponses
                access_log=None,
                auto_decompress=False,
                handler_cancellation=True,
                keepalive_timeout=75,
                max_field_size=MAX_HEADER_FIELD,
                max_line_size=MAX_REQUEST_LINE,
                max_headers=MAX_HEADERS,
                read_bufsize=16384,
            )
            self._web_server.head_timeout = self.config.header_timeout
        else:
            self._web_server = self.handler
        self._listener = InboundListener(
            self._web_server, self._new_h2_connection, head_timeout=self.config.header_timeout
        )
        for sock in socks:
            self._proxy_servers.append(await loop.create_server(self._listener, sock=sock, backlog=1024))
            self.addresses.append(sock.getsockname()[:2])
        self.port = self.addresses[0][1]
        self._gauge_task = loop.create_task(self._gauge_loop())
        log.info(
            "listening",
            extra={
                "listen": ",".join(hostport(*a) for a in self.addresses),
                "admin": hostport(admin_host, self.admin_port),
            },
        )

    @property
    def h2_streams(self):
        if self._h2_streams is None:
            from sigv4proxy.inbound.h2 import H2Streams

            self._h2_streams = H2Streams(self.exchange, self.inbound_settings)
        return self._h2_streams

    def _new_h2_connection(self, on_close):
        # our own frames, or the `h2` library's connection (the reference): the same inbound tests
        if self.config.h2_server_implementation == "lean":
            from sigv4proxy.inbound.h2server_lean import LeanH2ServerConnection as server
        else:
            from sigv4proxy.inbound.h2server import H2ServerConnection as server
        return server(self.h2_streams, idle_timeout=self.stream_idle_timeout, on_close=on_close)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Readiness goes 503, the listener stops accepting, in-flight requests finish (bounded)."""
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self._draining = True
        for server in self._proxy_servers:
            server.close()
        if self._web_server is not None:
            # Idle keep-alive connections close now; busy ones right after their response.
            self._web_server.pre_shutdown()
        if self._listener is not None:
            self._listener.begin_shutdown()  # HTTP/2: GOAWAY, open streams finish
        deadline = time.monotonic() + timeout
        while self.exchange.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.exchange.inflight:
            log.warning("drain timeout with requests in flight", extra={"inflight": self.exchange.inflight})
        if self._web_server is not None:
            await self._web_server.shutdown(timeout=1.0)
        if self._listener is not None:
            self._listener.close()
        if self._admin_listener is not None:
            self._admin_listener.close()
        if self._admin_server is not None:
            self._admin_server.pre_shutdown()
            await self._admin_server.shutdown(timeout=1.0)
        if self._gauge_task is not None:
            self._gauge_task.cancel()
        self.metrics.flush()  # this worker's last observations, before it exits
        await self.pool.aclose()
        await self.credentials.aclose()
