"""The HTTP/2 inbound adapter (h2c, gRPC): each inbound stream through the exchange.

Owns: turning one inbound stream (`h2stream.InboundStream`) into the exchange's `Inbound`
(`H2Exchange`): the request body as the upstream's body kinds (a small body already here as
bytes, else streamed with its trailers after it), the client's 100 when its body is first wanted,
1xx responses, relaying the answer with backpressure (a gRPC trailers-only answer kept one frame;
response trailers), cutting a broken answer (RST_STREAM, or gRPC error trailers), and the proxy's
own error answers on HTTP/2: `:status` + `x-sigv4proxy-error`, and for gRPC a trailers-only answer
with the mapped gRPC status as well. Must never: forward anything the exchange did not prepare,
buffer a body whole, or put a secret or header value in an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any
from urllib.parse import quote

from hpack import NeverIndexedHeaderTuple

from sigv4proxy.errors import BadRequest, PayloadTooLarge, ProxyError, UpstreamReset, UpstreamTimeout
from sigv4proxy.exchange.exchange import ERROR_HEADER, Body, Exchange, Response, StreamedBody, error_parts
from sigv4proxy.fields import DROP_RESPONSE
from sigv4proxy.inbound.h1_response import http_date
from sigv4proxy.inbound.h2stream import ClientGone, InboundStream
from sigv4proxy.inbound.settings import InboundSettings
from sigv4proxy.limits import SMALL_BODY
from sigv4proxy.wire.h2_wire import CANCEL, INTERNAL_ERROR

# gRPC status codes for the proxy's own HTTP errors (grpc/doc/http-grpc-status-mapping.md, except
# that our 504 is a timeout we measured, so DEADLINE_EXCEEDED rather than UNAVAILABLE).
GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 405: 12, 413: 8, 429: 14, 431: 8, 502: 14, 503: 14, 504: 4}
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


def _grpc_error_fields(exc: ProxyError) -> list[tuple[bytes, bytes]]:
    return [
        (b"grpc-status", str(grpc_status_for(exc.status)).encode("ascii")),
        (b"grpc-message", _grpc_message(f"sigv4proxy: {exc.reason}")),
        (ERROR_HEADER.encode("ascii"), exc.kind.encode("ascii")),
    ]


class _RequestBody(StreamedBody):
    """The inbound stream's body as the upstream's streamed body, with its trailers after it. A
    client that sent `expect: 100-continue` gets its 100 when the body is first wanted (unless the
    upstream's own 100 was forwarded already)."""

    def __init__(self, stream: InboundStream, limit: int | None, expect: bool) -> None:
        super().__init__()
        self.stream = stream
        self.limit = limit
        self.expect = expect

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return self.stream.trailers

    def chunks(self) -> AsyncIterator[bytes]:
        return _StreamChunks(self)


class _StreamChunks:
    """The stream's chunks as they arrive; past --max-body-size 413. An iterator class, not an
    async generator, so the module compiles (setup.py); like a generator it ends for good once
    it ends or fails."""

    def __init__(self, body: _RequestBody) -> None:
        self._stream = body.stream
        self._limit = body.limit
        self._expect = body.expect
        self._seen = 0
        self._over = False

    def __aiter__(self) -> _StreamChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._over:
            raise StopAsyncIteration
        stream = self._stream
        try:
            if self._expect:
                self._expect = False
                if not stream.continued:
                    stream.send_informational(100, [])
            chunk = await stream.read()  # returns the previous chunk's credit to the client
        except ClientGone:
            self._over = True
            raise BadRequest("client reset the request stream") from None
        except BaseException:
            self._over = True
            raise
        if not chunk:
            self._over = True
            raise StopAsyncIteration
        if self._limit is not None:
            self._seen += len(chunk)
            if self._seen > self._limit:
                self._over = True
                raise PayloadTooLarge("request body exceeds --max-body-size")
        return chunk


_NAME_LIMIT = 512  # response field names remembered (they come from the upstream)
_lowered: dict[bytes, bytes | None] = {}  # a name as the upstream sent it -> lower case, None: dropped


def _forwarded_fields(headers: list[Any], fields: list[Any], dated: bool = False) -> bool:
    """Appends the upstream's fields to `fields`: lower-cased, hop-by-hop dropped; a field the
    upstream sent never-indexed stays never-indexed (RFC 7541 §7.1.3: an intermediary must keep
    that representation, e.g. for cookies). `dated`: a final head, which gets a Date when the
    upstream sent none (RFC 9110 §6.6.1). True if a grpc-status was among them."""
    # The fields as objects (list[Any]): compiled, a tuple[bytes, bytes] would be unboxed and
    # rebuilt, and an hpack NeverIndexedHeaderTuple would lose its kind.
    lowered, grpc_status = _lowered, False
    for field in headers:
        name, value = field
        lname = lowered.get(name, b"")
        if lname == b"":
            lname = name.lower()
            lname = None if lname in _DROP_H2_RESPONSE else lname
            if len(lowered) < _NAME_LIMIT:
                lowered[bytes(name)] = lname
        if lname is None:
            continue
        if type(field) is tuple or not isinstance(field, NeverIndexedHeaderTuple):
            fields.append((lname, value))
        else:
            fields.append(NeverIndexedHeaderTuple(lname, value))
        if lname == b"date":
            dated = False
        elif lname == b"grpc-status":
            grpc_status = True
    if dated:
        fields.append((b"date", http_date(time.time)))
    return grpc_status


class H2Streams:
    """The `StreamHandler` of inbound HTTP/2 connections: each stream through the exchange."""

    def __init__(self, exchange: Exchange, settings: InboundSettings) -> None:
        self.exchange = exchange
        self.settings = settings

    def __call__(self, stream: InboundStream) -> Coroutine[Any, Any, None]:
        return self.exchange.run(H2Exchange(stream, self.settings))  # the stream's task: no wrapper


class H2Exchange:
    """One inbound HTTP/2 stream as the exchange's `Inbound`."""

    __slots__ = (
        "stream",
        "_settings",
        "method",
        "authority",
        "target",
        "raw_headers",
        "content_length",
        "has_body",
        "refusal",
        "grpc",
        "body_bytes",
    )

    from_h2 = True
    protocol = "HTTP/2"

    def __init__(self, stream: InboundStream, settings: InboundSettings) -> None:
        self.stream = stream
        self._settings = settings
        self.method = stream.method.decode("latin-1")
        self.authority = stream.authority.decode("latin-1") if stream.authority is not None else None
        self.target = stream.path.decode("latin-1")
        self.raw_headers = stream.headers
        self.grpc = _is_grpc(stream.headers)
        self.has_body = stream.has_body()
        self.body_bytes = 0
        self.content_length: int | None = None
        self.refusal: ProxyError | None = stream.refusal  # malformed (RFC 9113 §8.1.1): never forwarded
        if self.refusal is None:
            if not self.target.startswith("/"):
                self.refusal = BadRequest("unsupported request target form")
            elif stream.content_length >= 0:  # `fields.request_head` checked it (else: the refusal)
                self.content_length = stream.content_length

    @property
    def started(self) -> bool:
        return self.stream.response_started

    # --- the request ---
    def original_destination(self) -> tuple[str, int] | None:
        return self.stream.conn.original_destination() if self._settings.transparent else None

    def body(self, expect_continue: bool) -> Body:
        """All of a small body is usually here with the head: it goes upstream with its HEADERS in
        one write, with no upload task. Otherwise it streams, trailers after it."""
        stream, limit = self.stream, self._settings.max_body_size
        whole = stream.whole_body(SMALL_BODY)
        if whole is None:
            return _RequestBody(stream, limit, expect_continue)
        if limit is not None and len(whole) > limit:
            raise PayloadTooLarge("request body exceeds --max-body-size")
        return whole

    # --- the answer ---
    def interim(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """An upstream 1xx response, forwarded on the stream (at most one 100)."""
        stream = self.stream
        if status == 100 and stream.continued:
            return
        try:
            fields: list[tuple[bytes, bytes]] = []
            _forwarded_fields(headers, fields)
            stream.send_informational(status, fields)
        except ClientGone:
            pass  # the stream's task is cancelled with it

    async def relay(self, upstream: Response) -> None:
        stream = self.stream
        head = [(b":status", str(upstream.status).encode("ascii"))]
        # A gRPC "trailers-only" answer (grpc-status in the head) must stay one HEADERS frame with
        # END_STREAM: hold the head until the body proves empty (or is not, then send it first).
        held = _forwarded_fields(upstream.headers, head, dated=True)
        if not held:  # a body already here goes out in the same write as the head
            stream.send_headers(head, flush=not upstream.body_ready)
        async for chunk in upstream:
            if held:
                stream.send_headers(head)
                held = False
            self.body_bytes += len(chunk)
            # the last chunk carries END_STREAM itself: no empty DATA frame after it
            await stream.send_data(chunk, end_stream=upstream.body_complete and not upstream.trailers)
        trailers: list[tuple[bytes, bytes]] = []
        if upstream.trailers:
            _forwarded_fields(upstream.trailers, trailers)
        if held:
            stream.send_headers(head + trailers, end_stream=True)
        elif trailers:
            stream.send_headers(trailers, end_stream=True)
        elif not stream.local_ended:
            await stream.send_data(b"", end_stream=True)

    async def answer_error(self, exc: ProxyError) -> None:
        """The proxy's own answer; a gRPC call gets it trailers-only (HTTP status, gRPC status and
        our error kind in one frame)."""
        stream = self.stream
        if stream.closed:
            return
        headers, text = error_parts(exc)
        fields = [(b":status", str(exc.status).encode("ascii"))]
        if self.grpc:
            fields.append((b"content-type", b"application/grpc"))
            fields.extend(_grpc_error_fields(exc))
            if exc.status == 503:
                fields.append((b"retry-after", b"1"))
            stream.send_headers(fields, end_stream=True)
            return
        body = text.encode("utf-8")
        fields.extend((n.lower().encode("ascii"), v.encode("ascii")) for n, v in headers.items())
        fields.append((b"content-length", str(len(body)).encode("ascii")))
        stream.send_headers(fields)
        await stream.send_data(body, end_stream=True)

    def cut(self, exc: ProxyError | None) -> None:
        """A broken answer must never look complete: an upstream that reset is reset in turn
        (CANCEL); other breaks end a gRPC call with error trailers, anything else with a reset."""
        stream = self.stream
        if stream.closed or exc is None:
            return
        if isinstance(exc, UpstreamReset):
            stream.reset(CANCEL)
            return
        if self.grpc:
            try:
                stream.send_headers(_grpc_error_fields(exc), end_stream=True)
                return
            except ClientGone:
                pass
        stream.reset(INTERNAL_ERROR)

    def own_cancellation(self) -> ProxyError | None:
        """Our own idle sweep cancelled a stream with no bytes either way for too long: answer it
        (504) instead of vanishing. Any other cancellation is the client's."""
        stream = self.stream
        if not stream.idle_expired or stream.closed:
            return None
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        return UpstreamTimeout("HTTP/2 stream idle timeout")

    def log_fields(self) -> tuple[str, str | None, object, str | None]:
        stream = self.stream
        user_agent = next((v for n, v in stream.headers if n == b"user-agent"), None)
        return (
            self.target,
            self.authority,
            stream.conn.peername,
            user_agent.decode("latin-1") if user_agent is not None else None,
        )
