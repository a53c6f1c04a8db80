"""The upstream vocabulary: the response object and the connection shape (origins, limits and
timeouts are plain data in `sigv4proxy.model`).

Owns: the small interface every upstream connection implements (httpcore's shape), the `Response`
handed back to callers, and opening a transport (TCP, TLS with SNI/ALPN) before the pool decides
which protocol object takes it over. Must never: import anything about AWS (signing, credentials,
routing), touch h2 state, or log header values.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sigv4proxy.compat.mypyc import mypyc_attr
from sigv4proxy.errors import (
    BadRequest,
    RetryableStreamError,
    UpstreamConnectError,
    UpstreamDnsError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.body import StreamedBody

Headers = Sequence[tuple[bytes, bytes]]
# A request body: whole bytes, a declared streamed kind (`upstream.body`), or None. The pool also
# takes any async iterable and wraps it (`IteratedBody`).
Body = bytes | StreamedBody | None
# Receives each 1xx response (status, fields) of an exchange as it arrives, before the final one.
# Called from the connection's receive path: it must not await or raise anything but ProxyError.
Interim = Callable[[int, list[tuple[bytes, bytes]]], None]


def wake(waiter: asyncio.Future[bool] | None) -> None:
    """Ends a pending wait with True."""
    if waiter is not None and not waiter.done():
        waiter.set_result(True)


def expire_waiter(waiter: asyncio.Future[bool]) -> None:
    """Timer callback: a wait that is still pending ends with False (woken waits get True).

    Cheaper than asyncio.timeout, which cancels and uncancels the task, on per-request waits."""
    if not waiter.done():
        waiter.set_result(False)


@mypyc_attr(allow_interpreted_subclasses=True)  # the HTTP/2 streams subclass it in Python
class EventWait:
    """One task waits (`wait_event`) for a callback's `wake`, bounded by a plain loop timer.
    Its `conn` has the `loop` that runs it. A base holding both slots, not an empty mixin: compiled,
    the annotated names are its own attributes, and a subclass's slots of the same name would hide them."""

    __slots__ = ("conn", "waiter")
    waiter: asyncio.Future[bool] | None
    conn: Any

    def wake(self) -> None:
        wake(self.waiter)

    async def wait_event(self, timeout: float | None) -> bool:
        """False when `timeout` passed first."""
        loop = self.conn.loop
        waiter = self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, expire_waiter, waiter)
        try:
            return await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()


async def hold_for_continue(exchange: Any, loop: asyncio.AbstractEventLoop, timeout: float) -> bool:
    """Expect: 100-continue (RFC 9110 §10.1.1): an upload waits until the upstream sends 100 or a
    final answer, or for `timeout` of silence. `exchange` has `status`, `error` and a
    `continue_waiter` slot its connection wakes. False: answered (or failed) on the head alone,
    so the body is not sent."""
    if exchange.status is None and exchange.error is None:
        waiter = exchange.continue_waiter = loop.create_future()
        timer = loop.call_later(timeout, expire_waiter, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            exchange.continue_waiter = None
    return exchange.status is None and exchange.error is None


def check_request_fields(method: bytes, target: bytes, authority: bytes, headers: Headers) -> None:
    """BadRequest if CR, LF or NUL hides anywhere (header injection / h2->h1 smuggling)."""
    for part in (method, target, authority):
        if b"\r" in part or b"\n" in part or b"\x00" in part or b" " in part:
            raise BadRequest("request line contains CR, LF, NUL or a space")
    if not target or not method:
        raise BadRequest("request method or target is empty")
    _check_fields(headers, "request header")


def _check_fields(fields: Headers, what: str) -> None:
    """BadRequest if a name or value holds CR, LF or NUL, or a name is empty or has a colon."""
    for name, value in fields:
        if (
            b"\r" in value
            or b"\n" in value
            or b"\x00" in value
            or b"\r" in name
            or b"\n" in name
            or b"\x00" in name
            or b":" in name
            or not name
        ):
            raise BadRequest(f"{what} contains CR, LF or NUL, or a bad name")


def request_trailers(body: object) -> list[tuple[bytes, bytes]]:
    """Trailer fields a streamed request body offers once its iteration has ended (gRPC-style):
    HTTP/2 sends them as a trailing HEADERS frame, HTTP/1.1 after the last chunk of a chunked
    body (a body with a declared length has no room for them). Names and values are checked like
    headers."""
    trailers = body.trailers if isinstance(body, StreamedBody) else None
    if not trailers:
        return []
    fields = [(name.lower(), value) for name, value in trailers]
    _check_fields(fields, "request trailer")
    return fields


class ConnectionNotAvailable(RetryableStreamError):
    """The connection could not take the request after all (raced with close/GOAWAY/full).

    Raised before any byte of the request was sent; the pool re-queues without counting a retry.
    """


class ResponseBody(Protocol):
    """What a connection hands the `Response` to read the body from."""

    trailers: list[tuple[bytes, bytes]]

    @property
    def complete(self) -> bool:
        """Everything arrived and was read: the next read() returns b"" without waiting."""
        ...

    @property
    def ready(self) -> bool:
        """read() will return (a chunk, the end or an error) without waiting."""
        ...

    def take(self) -> bytes | None:
        """What read() would return without waiting (a chunk, b"" at the end; a typed error
        raised), or None when it would wait: a relay then needs no coroutine per chunk."""
        ...

    async def read(self) -> bytes:
        """The next non-empty chunk, b"" at the end; raises a typed error if the body broke."""
        ...

    def close(self) -> None:
        """Ends the exchange (an upload stopped, an unfinished stream reset); never waits."""
        ...


class _BodyIterator:
    __slots__ = ("_body",)

    def __init__(self, body: ResponseBody) -> None:
        self._body = body

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body.read()
        if not chunk:
            raise StopAsyncIteration
        return chunk


class Response:
    """An upstream response; iterate it for the body, then (or instead) `aclose()` it."""

    __slots__ = ("status", "headers", "http_version", "_body", "reason")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        body: ResponseBody,
        reason: bytes | None = None,
    ) -> None:
        self.status = status
        self.headers = headers  # no pseudo-headers; names as received
        self.http_version = http_version
        self._body = body
        self.reason = reason  # the HTTP/1.1 reason phrase as received (None: HTTP/2 has none)

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return self._body.trailers

    @property
    def body_complete(self) -> bool:
        """The chunk just read was the last (trailers, if any, are in): a relay can end its
        stream with that chunk instead of an empty frame after it."""
        return self._body.complete

    @property
    def body_ready(self) -> bool:
        """The next read will not wait: a relay can hold the head back to send it with that chunk."""
        return self._body.ready

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _BodyIterator(self._body)

    def take(self) -> bytes | None:
        """The next chunk (b"" at the end) if it is here, else None: then await `next_chunk()`."""
        return self._body.take()

    def next_chunk(self) -> Awaitable[bytes]:
        """The next chunk, b"" at the end, waiting for it (bounded by the read timeout)."""
        return self._body.read()

    async def read(self) -> bytes:
        """The whole remaining body (for small responses; streams should iterate)."""
        parts = [chunk async for chunk in self]
        return b"".join(parts)

    def close(self) -> None:
        """Ends the exchange: resets the upstream stream (or drops the socket) unless the body
        was read to its end. Nothing to wait for: the request path calls it without an await."""
        self._body.close()

    async def aclose(self) -> None:
        self._body.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.http_version}>"


class Connection(Protocol):
    """One upstream connection. Implementations are also the asyncio.Protocol of their transport.

    `handle_request` claims its stream/socket slot before its first suspension, or raises
    `ConnectionNotAvailable` without sending anything.
    """

    origin: Origin
    http_version: str

    def is_available(self) -> bool: ...
    def capacity(self) -> int:
        """How many more requests it could take right now (0 when not available)."""
        ...

    def is_idle(self) -> bool: ...
    def is_closed(self) -> bool: ...
    def has_expired(self, now: float) -> bool: ...
    def active_streams(self) -> int: ...

    async def wait_ready(self, timeout: float) -> None:
        """Returns once the connection can take requests (h2: the peer's SETTINGS arrived)."""
        ...

    async def handle_request(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        body: Body,
        interim: Interim | None = None,
        expect_continue: bool = False,
    ) -> Response:
        """`interim` gets the 1xx responses; `expect_continue` holds a streamed body until the
        upstream's 100 or final answer, or `Timeouts.expect_continue` (the request carries the
        `expect: 100-continue` field)."""
        ...

    async def aclose(self) -> None: ...


# `on_change(connection)` is called when a slot frees, the connection becomes ready, or it closes.
OnChange = Callable[[Any], None]  # called with the Connection (implemented structurally by its classes)
# Builds a connection object for an already open transport; the pool attaches it as the protocol.
ConnectionFactory = Callable[[Origin, Timeouts, OnChange], Connection]


class _HandoverProtocol(asyncio.Protocol):
    """Holds a freshly opened transport until the real protocol object takes it over."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffered: list[bytes] = []
        self.eof = False
        self.lost: BaseException | None | bool = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffered.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc if exc is not None else True


@dataclass(slots=True)
class OpenedTransport:
    transport: asyncio.Transport
    alpn: str | None  # negotiated ALPN protocol, None for plain TCP or no ALPN
    _handover: _HandoverProtocol

    def attach(self, protocol: asyncio.Protocol) -> None:
        """Hands the transport (and any bytes that already arrived) to `protocol`."""
        handover = self._handover
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        for data in handover.buffered:
            protocol.data_received(data)
        handover.buffered.clear()
        if handover.lost is not False:
            protocol.connection_lost(None if handover.lost is True else handover.lost)  # type: ignore[arg-type]
        elif handover.eof:
            protocol.eof_received()


# getaddrinfo's failures as fixed reasons (never the name: it may be the client's Host).
_DNS_REASONS = {
    socket.EAI_NONAME: "upstream host name not found (DNS)",
    socket.EAI_AGAIN: "upstream host name lookup failed for now (DNS server failure or no answer)",
}


async def open_transport(origin: Origin, ssl_context: ssl.SSLContext | None, timeout: float) -> OpenedTransport:
    """TCP connect (+ TLS handshake with SNI/ALPN for https) within `timeout`, as typed errors.

    A host name is resolved by the loop's getaddrinfo on every call: nothing here caches an
    address, so a new connection follows the DNS answer of the moment."""
    loop = asyncio.get_running_loop()
    handover = _HandoverProtocol()
    tls = origin.scheme == "https"
    kwargs: dict = {}
    if tls:
        if ssl_context is None:
            raise UpstreamConnectError("https origin without a TLS context")
        kwargs = {
            "ssl": ssl_context,
            "server_hostname": origin.server_hostname or origin.host,
            "ssl_handshake_timeout": timeout,
        }
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: handover, origin.host, origin.port, **kwargs)
    except TimeoutError:
        raise UpstreamTimeout("connect timed out") from None
    except ssl.SSLCertVerificationError:
        raise UpstreamConnectError("TLS certificate verification failed") from None
    except ssl.SSLError:
        raise UpstreamConnectError("TLS handshake failed") from None
    except ConnectionRefusedError:
        raise UpstreamConnectError("connection refused") from None
    except socket.gaierror as exc:
        raise UpstreamDnsError(_DNS_REASONS.get(exc.errno or 0, "upstream host name lookup failed")) from None
    except OSError as exc:
        raise UpstreamConnectError(f"connect failed: {type(exc).__name__}") from None
    alpn = None
    if tls:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    return OpenedTransport(transport, alpn, handover)


def choose_protocol(origin: Origin, alpn: str | None) -> str:
    """ "h2" or "http1" for an opened transport, or UpstreamProtocolError if ALPN contradicts."""
    if origin.scheme == "http":
        return "h2" if origin.protocol == "h2" else "http1"
    if origin.protocol == "h2":
        if alpn not in ("h2", None):  # None: the peer does no ALPN; speak h2 as configured
            raise UpstreamProtocolError("peer refused ALPN h2")
        return "h2"
    if origin.protocol == "http1":
        if alpn == "h2":
            raise UpstreamProtocolError("peer chose ALPN h2 for an http1 origin")
        return "http1"
    return "h2" if alpn == "h2" else "http1"
