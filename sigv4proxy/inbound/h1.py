"""The request path: inbound request → route → sign → upstream → streamed response.

Owns: the HTTP/1.1 request's path (hygiene, routing and signing via `request_prep`), reading the
request body, streaming the response back (framed by `inbound.h1_response`), the one place where
typed errors become HTTP responses, and per-request stage timings handed to metrics. Must never:
forward a request unsigned, put a secret or header value in an error body or log, buffer a body
whole, or log per request above debug.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from functools import partial
from typing import AsyncIterator, Awaitable, Callable, Iterable

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from sigv4proxy.observe import accesslog
from sigv4proxy.aws.credentials import CredentialStore
from sigv4proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotSupported,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
)
from sigv4proxy.inbound.h1_response import Answered, ResponseWriter
from sigv4proxy.inbound.h1_splice import SpliceableBody
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.exchange.prepare import RequestPreparer, split_target
from sigv4proxy.aws.routing import Router
from sigv4proxy.io.splice import AVAILABLE as splice_available
from sigv4proxy.io.splice import CLIENT_STALLED, SHORT_BODY
from sigv4proxy.upstream.pool import ConnectionPool

log = logging.getLogger("sigv4proxy.inbound.h1")

ERROR_HEADER = "x-sigv4proxy-error"
# Inbound parser limits (bytes). A header line over MAX_HEADER_FIELD is 431; the request line has
# a different limit so that the parser's LineTooLong tells the two apart (by its limit).
MAX_HEADER_FIELD = 16384
MAX_REQUEST_LINE = 16384 + 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A declared body up to this size is read whole (bounded memory: at most this per request) and
# handed on as bytes: the upstream then sends head and body in one write, with no send task, and
# can replay it on a refused stream. Larger or chunked bodies stream.
SMALL_BODY = 64 * 1024


class _BodyStalled(TimeoutError):
    """Set on the body stream of a client silent for --read-timeout. A TimeoutError, so that
    aiohttp's own read of the leftover body after our 408 takes it quietly and closes."""


def _stall(content: StreamReader) -> None:
    """Timer callback: the waiting read raises _BodyStalled."""
    content.set_exception(_BodyStalled())


class ProxyHandler:
    """The aiohttp low-level request handler. One instance per worker."""

    def __init__(
        self,
        router: Router,
        credentials: CredentialStore,
        pool: ConnectionPool,
        metrics: Metrics,
        *,
        max_body_size: int | None = None,
        max_inflight: int | None = None,
        transparent: bool = False,
        strip_headers: Iterable[str] = (),
        add_headers: Iterable[tuple[str, str]] = (),
        duplicate_headers: Iterable[str] = (),
        access_log: bool = False,
        body_timeout: float = 60.0,
        splice: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._max_body = max_body_size
        self._max_inflight = max_inflight
        self._transparent = transparent
        self._body_timeout = body_timeout  # longest client silence mid-body (408 after)
        self._splice = splice and splice_available  # large declared-length bodies may skip the process
        self._clock = clock
        self._writer = ResponseWriter(clock)  # the response head and body, as bytes of our own
        # Hygiene, routing and signing, shared with the HTTP/2 inbound path.
        self.prepare = RequestPreparer(
            router, credentials, max_body_size=max_body_size, strip_headers=strip_headers,
            add_headers=add_headers, duplicate_headers=duplicate_headers, clock=clock).prepare
        self._access_log = access_log
        self.inflight = 0
        # Original destination per inbound connection (transparent mode), read once.
        self._original_dst: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse | Answered:
        started = time.perf_counter()
        self.inflight += 1
        route_name = "none"
        try:
            if self._max_inflight is not None and self.inflight > self._max_inflight:
                raise Overloaded("too many requests in flight")
            response, route_name = await self._proxy(request, started)
            return response
        except ProxyError as exc:
            if self._access_log:
                self._log_access(request, started, exc.status, route_name, None, None, None, exc.kind)
            return self._error(exc, request.method, route_name, started)
        finally:
            self.inflight -= 1
            if request.protocol.reads_held:  # a streamed body: aiohttp reads what we left of it
                request.protocol.hold_reading(False)

    async def _proxy(self, request: web.BaseRequest, started: float) -> tuple[Answered, str]:
        method = request.method
        if method == "CONNECT":  # before the target parse: its authority-form target is not a path
            raise MethodNotSupported("CONNECT is not supported (VPC Lattice does not tunnel)")
        authority, target = split_target(request.raw_path)
        original_dst = self._original_destination(request) if self._transparent else None
        prepared = self.prepare(method, authority, target, request.raw_headers, request.content_length,
                                original_dst)
        route = prepared.route
        route_name = route.name
        has_body = request.body_exists

        response = Answered(0)
        # Expect: 100-continue goes upstream with the request: the client's 100 is the upstream's
        # own, or ours when its body is first wanted; a refusal on the head alone comes first.
        expect = prepared.expect_continue and has_body
        response.expects = expect
        body: bytes | AsyncIterator[bytes] | None = None
        if has_body:
            length = request.content_length
            if length is not None and length <= SMALL_BODY and not expect:
                body = await self._small_body(request, length)
            elif length is not None and self._splice:
                body = SpliceableBody(self._body(request, response), request, length, self._body_timeout,
                                      partial(_send_continue, request, response) if expect else None)
            else:
                body = self._body(request, response)
        upstream = await self._pool.request(
            route.origin, method.encode("ascii"), target.encode("latin-1"), route.authority_bytes,
            prepared.headers, body, partial(self._interim, request, response), expect,
        )
        first_byte = time.perf_counter()
        response.status = upstream.status
        complete = False
        try:
            await self._writer.relay(request, upstream, response)
            complete = True
        except (ConnectionError, ProxyError) as exc:
            if isinstance(exc, ProxyError) and not response.started:
                raise  # nothing written yet: the client gets the typed error answer
            # The head is out: the only honest signal left is a cut connection, after every byte
            # the upstream did send (a close flushes them; a client gone gets an abort).
            log.debug("response aborted mid-body: %s", type(exc).__name__)
            self._metrics.errors_for(getattr(exc, "kind", "client_disconnect")).inc()
            response.keep_alive = False
            if request.transport is not None:
                if isinstance(exc, ProxyError):
                    request.transport.close()
                else:
                    request.transport.abort()
        finally:
            await upstream.aclose()
        self._metrics.observe_request(
            method, upstream.status if complete else 0, route_name, time.perf_counter() - started,
            prepared.sign_done - prepared.sign_started, first_byte - prepared.sign_done, upstream.http_version,
        )
        if self._access_log:
            self._log_access(request, started, upstream.status, route_name, first_byte - prepared.sign_done,
                             upstream.http_version, response.body_bytes, None if complete else "response_aborted")
        return response, route_name

    def _log_access(self, request: web.BaseRequest, started: float, status: int, route: str,
                    to_target: float | None, upstream_protocol: str | None, sent: int | None,
                    failure: str | None) -> None:
        elapsed = time.perf_counter() - started
        headers = request.headers
        accesslog.record(
            start=self._clock() - elapsed, method=request.method, path=request.raw_path,
            host=headers.get("Host"), peer=request.transport.get_extra_info("peername") if request.transport else None,
            user_agent=headers.get("User-Agent"), status=status, duration=elapsed, to_target=to_target,
            route=route, upstream_protocol=upstream_protocol, bytes_sent=sent, failure=failure,
        )

    async def _client_read(self, content: StreamReader, read: Awaitable[bytes],
                           loop: asyncio.AbstractEventLoop) -> bytes:
        """`read` of the request body, failed with 408 after --read-timeout of client silence: a
        plain timer poisons the stream (cheaper per chunk than asyncio.timeout)."""
        timer = loop.call_later(self._body_timeout, _stall, content)
        try:
            return await read
        except _BodyStalled:
            raise RequestTimeout(CLIENT_STALLED) from None
        finally:
            timer.cancel()

    async def _small_body(self, request: web.BaseRequest, length: int) -> bytes:
        """A declared body of at most SMALL_BODY bytes, whole; usually already buffered."""
        content = request.content
        data = content.read_nowait(length)
        if len(data) < length:
            try:
                data += await self._client_read(content, content.readexactly(length - len(data)),
                                                asyncio.get_running_loop())
            except asyncio.IncompleteReadError:
                raise BadRequest(SHORT_BODY) from None
        return data

    def _interim(self, request: web.BaseRequest, response: Answered, status: int,
                 headers: list[tuple[bytes, bytes]]) -> None:
        """An upstream 1xx response, forwarded (at most one 100)."""
        if status == 100:
            if response.continued:
                return
            response.continued = True
        self._writer.interim(request, status, headers)

    async def _body(self, request: web.BaseRequest, response: Answered) -> AsyncIterator[bytes]:
        """A streamed request body. A client that stops sending for --read-timeout while we wait
        for it fails the request (408, the upstream stream cancelled); time spent waiting for
        the upstream to take what we have does not count. A client waiting for 100 (Continue)
        gets it when the body is first wanted."""
        if response.expects:
            _send_continue(request, response)
        limit = self._max_body
        seen = 0
        content = request.content
        loop = asyncio.get_running_loop()  # once: in Python 3.11 each call is a getpid() syscall
        # The socket is read only when the next chunk is wanted (released in __call__: an upload
        # cut short upstream leaves this generator suspended, not closed).
        protocol = request.protocol
        protocol.hold_reading(True)
        while True:
            protocol.read_more()
            chunk = await self._client_read(content, content.readany(), loop)
            if not chunk:
                return
            if limit is not None:
                seen += len(chunk)
                if seen > limit:
                    raise PayloadTooLarge("request body exceeds --max-body-size")
            yield chunk

    def _original_destination(self, request: web.BaseRequest) -> tuple[str, int] | None:
        from sigv4proxy.io.original_dst import original_destination

        protocol = request.protocol
        if protocol in self._original_dst:
            return self._original_dst[protocol]
        sock = request.transport.get_extra_info("socket") if request.transport else None
        dst = original_destination(sock) if sock is not None else None
        self._original_dst[protocol] = dst
        return dst

    def record_failure(self, exc: ProxyError, method: str, route_name: str, started: float) -> None:
        """Metrics and debug log for a request answered with a typed error (both inbound paths)."""
        self._metrics.errors_for(exc.kind).inc()
        self._metrics.observe_request(method, exc.status, route_name, time.perf_counter() - started)
        log.debug("request failed: %s (%s)", exc.kind, exc.reason)

    def malformed_request(self, exc: BaseException) -> web.Response:
        """The answer to a request aiohttp's parser refused: typed, counted, no request bytes echoed
        (aiohttp's own page quotes the offending line) and logged at debug only (clients cause it)."""
        error = parse_error(exc)
        self._metrics.errors_for(error.kind).inc()
        log.debug("malformed request: %s (%s)", error.kind, type(exc).__name__)
        headers, text = error_parts(error)
        response = web.Response(status=error.status, text=text, headers=headers)
        response.force_close()
        return response

    def _error(self, exc: ProxyError, method: str, route_name: str, started: float) -> web.Response:
        self.record_failure(exc, method, route_name, started)
        headers, text = error_parts(exc)
        response = web.Response(status=exc.status, text=text, headers=headers)
        if exc.closes_connection:
            response.force_close()
        return response


def _send_continue(request: web.BaseRequest, response: Answered) -> None:
    """Our own 100 (Continue), unless the upstream's was forwarded: the body is wanted now."""
    if not response.continued and request.transport is not None:
        response.continued = True
        request.transport.write(_CONTINUE)


def parse_error(exc: BaseException) -> ProxyError:
    """A typed error for an inbound parse failure: 431 for a header line over the limit or too many
    headers, 400 for everything else; the reason is fixed text, never the parser's message."""
    if isinstance(exc, LineTooLong) and str(exc.args[1]) == str(MAX_HEADER_FIELD):
        return HeadersTooLarge("request header field too large")
    if isinstance(exc, LineTooLong):
        return BadRequest("request line too long")
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return HeadersTooLarge("too many request headers")
    return BadRequest("malformed HTTP request")


def error_parts(exc: ProxyError) -> tuple[dict[str, str], str]:
    """Headers and body text of the proxy's own answer to a typed error (fixed reason, no secret)."""
    # Server names the answerer without aiohttp's default, which gives away Python and aiohttp versions
    headers = {ERROR_HEADER: exc.kind, "Content-Type": "text/plain; charset=utf-8", "Server": "sigv4proxy"}
    if exc.status == 503:
        headers["Retry-After"] = "1"
    return headers, f"sigv4proxy: {exc.reason}\n"
