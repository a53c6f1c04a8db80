"""The request path for inbound HTTP/2 streams (h2c, gRPC): stream → prepare/sign → upstream stream.

Owns: mapping each inbound stream one to one onto `ConnectionPool.request`, relaying body chunks
both ways with backpressure, 1xx responses (and the client's 100 when the body is first wanted),
request and response trailers (`grpc-status`, `grpc-message`),
cancellation both ways, and answering typed errors on HTTP/2: `:status` + `x-sigv4proxy-error`,
and for gRPC requests a trailers-only answer carrying the mapped gRPC status as well.
Header hygiene, routing and signing are `ProxyHandler.prepare`, shared with HTTP/1.1.
Must never: forward a request unsigned, put a secret or header value in an error, buffer a body
whole, or log per request above debug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from urllib.parse import quote

from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from sigv4proxy.observe import accesslog
from sigv4proxy.errors import BadRequest, Overloaded, PayloadTooLarge, ProxyError, UpstreamReset, UpstreamTimeout
from sigv4proxy.inbound.h1 import ERROR_HEADER, SMALL_BODY, ProxyHandler, error_parts
from sigv4proxy.header_rules import DROP_RESPONSE
from sigv4proxy.inbound.h1_response import http_date
from sigv4proxy.inbound.h2stream import ClientGone, InboundStream
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.upstream.base import Response
from sigv4proxy.upstream.pool import ConnectionPool

log = logging.getLogger("sigv4proxy.inbound")

# gRPC status codes for the proxy's own HTTP errors (grpc/doc/http-grpc-status-mapping.md, except
# that our 504 is a timeout we measured, so DEADLINE_EXCEEDED rather than UNAVAILABLE).
GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 405: 12, 413: 8, 429: 14, 431: 8,
               502: 14, 503: 14, 504: 4}
GRPC_UNKNOWN = 2
# The response head also drops what HTTP/2 forbids; content-length stays (bytes pass unchanged).
_DROP_H2_RESPONSE = frozenset(n.encode("ascii") for n in (DROP_RESPONSE - {"content-length"}) | {"host"})


def grpc_status_for(http_status: int) -> int:
    return GRPC_STATUS.get(http_status, GRPC_UNKNOWN)


def _is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value[:16].lower() == b"application/grpc"
    return False


def _grpc_message(text: str) -> bytes:
    """gRPC percent-encodes grpc-message (anything outside printable ASCII, and '%')."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


class _RequestBody:
    """The inbound stream's body as the upstream's streamed body, with its trailers after it. A
    client that sent `expect: 100-continue` gets its 100 when the body is first wanted (unless the
    upstream's own 100 was forwarded already)."""

    __slots__ = ("_stream", "_limit", "_expect")

    def __init__(self, stream: InboundStream, limit: int | None, expect: bool) -> None:
        self._stream = stream
        self._limit = limit
        self._expect = expect

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return self._stream.trailers

    async def __aiter__(self):
        stream, limit, seen = self._stream, self._limit, 0
        if self._expect and not stream.continued:
            try:
                stream.send_informational(100, [])
            except ClientGone:
                raise BadRequest("client reset the request stream") from None
        while True:
            try:
                chunk = await stream.read()  # returns the previous chunk's credit to the client
            except ClientGone:
                raise BadRequest("client reset the request stream") from None
            if not chunk:
                return
            if limit is not None:
                seen += len(chunk)
                if seen > limit:
                    raise PayloadTooLarge("request body exceeds --max-body-size")
            yield chunk


def _forwarded_fields(headers: list[tuple[bytes, bytes]], dated: bool = False) -> list[tuple[bytes, bytes]]:
    """Lower-cased, hop-by-hop dropped; a field the upstream sent never-indexed stays never-indexed
    (RFC 7541 §7.1.3: an intermediary must keep that representation, e.g. for cookies). `dated`:
    a final head, which gets a Date when the upstream sent none (RFC 9110 §6.6.1)."""
    fields: list[tuple[bytes, bytes]] = []
    for field in headers:
        name, value = field
        lname = name.lower()
        if lname not in _DROP_H2_RESPONSE:
            fields.append(NeverIndexedHeaderTuple(lname, value)
                          if isinstance(field, NeverIndexedHeaderTuple) else (lname, value))
            if lname == b"date":
                dated = False
    if dated:
        fields.append((b"date", http_date(time.time)))
    return fields


def _interim(stream: InboundStream, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    """An upstream 1xx response, forwarded on the stream (at most one 100)."""
    if status == 100 and stream.continued:
        return
    try:
        stream.send_informational(status, _forwarded_fields(headers))
    except ClientGone:
        pass  # the stream's task is cancelled with it


def _response_fields(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(b":status", str(status).encode("ascii")), *_forwarded_fields(headers, dated=True)]


class H2ProxyStreams:
    """The `StreamHandler` of inbound HTTP/2 connections. One instance per worker."""

    def __init__(self, handler: ProxyHandler, pool: ConnectionPool, metrics: Metrics, *,
                 max_body_size: int | None = None, max_inflight: int | None = None,
                 transparent: bool = False, access_log: bool = False) -> None:
        self._access_log = access_log
        self._handler = handler
        self._pool = pool
        self._metrics = metrics
        self._max_body = max_body_size
        self._max_inflight = max_inflight
        self._transparent = transparent

    async def __call__(self, stream: InboundStream) -> None:
        started = time.perf_counter()
        handler = self._handler
        handler.inflight += 1  # shared with HTTP/1.1: one in-flight count (gauge), one drain
        method = stream.method.decode("latin-1")
        grpc = _is_grpc(stream.headers)
        route_name = "none"
        status, failure = 0, None
        try:
            if self._max_inflight is not None and handler.inflight > self._max_inflight:
                raise Overloaded("too many requests in flight")
            route_name, status = await self._proxy(stream, method, grpc, started)
            failure = None if status else "response_aborted"
        except asyncio.CancelledError:
            if not stream.idle_expired or stream.closed:
                self._metrics.errors_for("client_disconnect").inc()
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # our own idle timer cancelled us: answer instead of vanishing
            exc = UpstreamTimeout("HTTP/2 stream idle timeout")
            status, failure = exc.status, exc.kind
            handler.record_failure(exc, method, route_name, started)
            await self._fail(stream, exc, grpc)
        except ProxyError as exc:
            status, failure = exc.status, exc.kind
            handler.record_failure(exc, method, route_name, started)
            await self._fail(stream, exc, grpc)
        except ClientGone:
            failure = "client_disconnect"
            self._metrics.errors_for("client_disconnect").inc()
        finally:
            handler.inflight -= 1
            if self._access_log:
                elapsed = time.perf_counter() - started
                headers = dict(stream.headers)
                ua = headers.get(b"user-agent")
                accesslog.record(
                    start=time.time() - elapsed, method=method, path=stream.path.decode("latin-1"),
                    host=stream.authority.decode("latin-1") if stream.authority else None,
                    peer=stream.conn.peername, user_agent=ua.decode("latin-1") if ua else None,
                    status=status, duration=elapsed, to_target=None, route=route_name,
                    upstream_protocol=None, bytes_sent=None, failure=failure, protocol="HTTP/2")

    async def _proxy(self, stream: InboundStream, method: str, grpc: bool, started: float) -> str:
        if stream.refusal is not None:  # malformed (RFC 9113 §8.1.1): never forwarded
            raise stream.refusal
        path = stream.path.decode("latin-1")
        if not path.startswith("/"):
            raise BadRequest("unsupported request target form")
        authority = stream.authority.decode("latin-1") if stream.authority is not None else None
        content_length = None
        for name, value in stream.headers:
            if name == b"content-length":
                if not value.isdigit():
                    raise BadRequest("malformed content-length")
                content_length = int(value)
        original_dst = self._original_destination(stream) if self._transparent else None
        prepared = self._handler.prepare(method, authority, path, stream.headers, content_length,
                                         original_dst, from_h2=True)
        route = prepared.route
        body: bytes | _RequestBody | None = None
        expect = False
        if stream.has_body():
            # all of a small body is usually here with the head: it goes upstream with its
            # HEADERS in one write, with no upload task
            body = stream.whole_body(SMALL_BODY)
            if body is None:
                expect = prepared.expect_continue
                body = _RequestBody(stream, self._max_body, expect)
            elif self._max_body is not None and len(body) > self._max_body:
                raise PayloadTooLarge("request body exceeds --max-body-size")
        upstream = await self._pool.request(
            route.origin, stream.method, stream.path, route.authority_bytes, prepared.headers, body,
            partial(_interim, stream), expect)
        first_byte = time.perf_counter()
        status = await self._relay(stream, upstream, grpc)
        self._metrics.observe_request(
            method, status, route.name, time.perf_counter() - started,
            prepared.sign_done - prepared.sign_started, first_byte - prepared.sign_done,
            upstream.http_version)
        return route.name, status

    async def _relay(self, stream: InboundStream, upstream: Response, grpc: bool) -> int:
        """Streams the response back; returns its status, or 0 if it was cut."""
        head = _response_fields(upstream.status, upstream.headers)
        # A gRPC "trailers-only" answer (grpc-status in the head) must stay one HEADERS frame with
        # END_STREAM: hold the head until the body proves empty (or is not, then send it first).
        held = any(name == b"grpc-status" for name, _ in head)
        try:
            if not held:  # a body already here goes out in the same write as the head
                stream.send_headers(head, flush=not upstream.body_ready)
            async for chunk in upstream:
                if held:
                    stream.send_headers(head)
                    held = False
                # the last chunk carries END_STREAM itself: no empty DATA frame after it
                await stream.send_data(chunk, end_stream=upstream.body_complete and not upstream.trailers)
            trailers = _forwarded_fields(upstream.trailers)
            if held:
                stream.send_headers(head + trailers, end_stream=True)
            elif trailers:
                stream.send_headers(trailers, end_stream=True)
            elif not stream.local_ended:
                await stream.send_data(b"", end_stream=True)
            return upstream.status
        except ProxyError as exc:
            self._metrics.errors_for(exc.kind).inc()
            log.debug("HTTP/2 response aborted mid-body: %s", exc.kind)
            if not stream.response_started:
                raise  # nothing sent yet: answer with the typed error
            if isinstance(exc, UpstreamReset):
                stream.reset(ErrorCodes.CANCEL)  # the upstream cancelled: so do we
            else:
                await self._fail(stream, exc, grpc)
            return 0
        finally:
            await upstream.aclose()  # resets the upstream stream unless it completed

    @staticmethod
    def _grpc_error_fields(exc: ProxyError) -> list[tuple[bytes, bytes]]:
        return [(b"grpc-status", str(grpc_status_for(exc.status)).encode("ascii")),
                (b"grpc-message", _grpc_message(f"sigv4proxy: {exc.reason}")),
                (ERROR_HEADER.encode("ascii"), exc.kind.encode("ascii"))]

    async def _fail(self, stream: InboundStream, exc: ProxyError, grpc: bool) -> None:
        """The proxy's own answer to a typed error; once the response started, gRPC gets error
        trailers and anything else a reset (a cut body must never look complete)."""
        if stream.closed:
            return
        if stream.response_started:
            if grpc:
                try:
                    stream.send_headers(self._grpc_error_fields(exc), end_stream=True)
                    return
                except ClientGone:
                    pass
            stream.reset(ErrorCodes.INTERNAL_ERROR)
            return
        headers, text = error_parts(exc)
        fields = [(b":status", str(exc.status).encode("ascii"))]
        if grpc:  # trailers-only: HTTP status, gRPC status and our error kind in one frame
            fields.append((b"content-type", b"application/grpc"))
            fields.extend(self._grpc_error_fields(exc))
            if exc.status == 503:
                fields.append((b"retry-after", b"1"))
            try:
                stream.send_headers(fields, end_stream=True)
            except ClientGone:
                pass
            return
        body = text.encode("utf-8")
        fields.extend((n.lower().encode("ascii"), v.encode("ascii")) for n, v in headers.items())
        fields.append((b"content-length", str(len(body)).encode("ascii")))
        try:
            stream.send_headers(fields)
            await stream.send_data(body, end_stream=True)
        except ClientGone:
            pass

    @staticmethod
    def _original_destination(stream: InboundStream) -> tuple[str, int] | None:
        return stream.conn.original_destination()
