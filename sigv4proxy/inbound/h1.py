"""The HTTP/1.1 inbound adapter: aiohttp's parsed request in, the exchange in between, our own bytes
out.

Owns: turning one aiohttp request into the exchange's `Inbound` (`H1Exchange`): the target's form,
the request body as the upstream's body kinds (a small declared body read whole, a larger one
taken off the socket when it can be, otherwise streamed with a client-silence bound), the client's
100 (Continue) when its body is first wanted, the original destination in transparent mode, the
answer written by `h1_response`, the proxy's own error answers as aiohttp responses, and the
answer to a request aiohttp's parser refused. Must never: forward anything the exchange did not
prepare, buffer a body whole, or put a header value or a request byte in an error.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from sigv4proxy.compat.aiohttp import InboundRequestHandler, WrittenResponse
from sigv4proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotSupported,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
)
from sigv4proxy.exchange.exchange import Body, Exchange, IteratedBody, error_parts
from sigv4proxy.exchange.prepare import split_target
from sigv4proxy.inbound.h1_answer import Answer
from sigv4proxy.inbound.h1_response import ResponseWriter
from sigv4proxy.inbound.h1_splice import SpliceableBody
from sigv4proxy.inbound.settings import InboundSettings
from sigv4proxy.io.splice import AVAILABLE as splice_available
from sigv4proxy.io.splice import CLIENT_STALLED, SHORT_BODY
from sigv4proxy.limits import MAX_HEADER_FIELD, SMALL_BODY

log = logging.getLogger("sigv4proxy.inbound.h1")


class _BodyStalled(TimeoutError):
    """Set on the body stream of a client silent for --read-timeout. A TimeoutError, so that
    aiohttp's own read of the leftover body after our 408 takes it quietly and closes."""


def _stall(content: StreamReader) -> None:
    """Timer callback: the waiting read raises _BodyStalled."""
    content.set_exception(_BodyStalled())


class H1Handler:
    """aiohttp's low-level request handler: each request through the exchange. One per worker."""

    def __init__(self, exchange: Exchange, settings: InboundSettings, clock: Callable[[], float]) -> None:
        self.exchange = exchange
        self.settings = settings
        self.splice = settings.splice and splice_available  # large declared bodies may skip the process
        self.writer = ResponseWriter(clock, settings.read_timeout)  # the response head and body, as bytes of our own
        # Original destination per inbound connection (transparent mode), read once.
        self.original_dst: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse | H1Exchange:
        inbound = H1Exchange(self, request)
        try:
            await self.exchange.run(inbound)
        finally:
            protocol = _handler_of(request)
            if protocol.reads_held:  # a streamed body: aiohttp reads what we left of it
                protocol.hold_reading(False)
        return inbound.error_response or inbound

    def malformed_request(self, exc: BaseException) -> web.Response:
        """The answer to a request aiohttp's parser refused: typed, counted, no request bytes echoed
        (aiohttp's own page quotes the offending line)."""
        error = parse_error(exc)
        self.exchange.refused(error)
        response = _error_response(error)
        response.force_close()
        return response


class AiohttpAnswer(Answer, WrittenResponse):
    """An answer written over an aiohttp request's connection; once written, also what aiohttp's
    request loop needs of a response already sent (`WrittenResponse`)."""

    def __init__(self, request: web.BaseRequest, status: int = 0) -> None:
        self.request = request
        self.method = request.method
        self.status = status

    @property
    def transport(self) -> asyncio.Transport | None:  # type: ignore[override]
        return self.request.transport

    @property
    def version(self) -> tuple[int, int]:  # type: ignore[override]
        return self.request.version

    @property
    def client_keep_alive(self) -> bool:  # type: ignore[override]
        return self.request.keep_alive

    @property
    def writing_paused(self) -> bool:
        return self.request.protocol.writing_paused

    def drain(self) -> Awaitable[None]:  # type: ignore[override]
        return self.request.writer.drain()


class H1Exchange(AiohttpAnswer):
    """One HTTP/1.1 request as the exchange's `Inbound`; once answered, also what aiohttp's request
    loop needs of a response already written (`AiohttpAnswer`)."""

    from_h2 = False
    protocol = "HTTP/1.1"
    refusal: ProxyError | None = None  # set when the target cannot be taken (never forwarded)
    error_response: web.Response | None = None  # the proxy's own answer, for aiohttp to write

    def __init__(self, handler: H1Handler, request: web.BaseRequest) -> None:
        self._handler = handler
        self.request = request
        self.method = method = request.method
        self.raw_headers = request.raw_headers
        self.content_length = request.content_length
        self.has_body = request.body_exists
        try:
            if method == "CONNECT":  # before the target parse: its authority-form target is not a path
                raise MethodNotSupported("CONNECT is not supported (VPC Lattice does not tunnel)")
            self.authority, self.target = split_target(request.raw_path)
        except ProxyError as exc:
            self.refusal = exc
            self.authority, self.target = None, request.raw_path

    # --- the request ---
    def original_destination(self) -> tuple[str, int] | None:
        if not self._handler.settings.transparent:
            return None
        from sigv4proxy.io.original_dst import original_destination

        protocol = self.request.protocol
        cache = self._handler.original_dst
        if protocol not in cache:
            transport = self.request.transport
            sock = transport.get_extra_info("socket") if transport else None
            cache[protocol] = original_destination(sock) if sock is not None else None
        return cache[protocol]

    def body(self, expect_continue: bool) -> Body | Awaitable[Body]:
        """A declared body up to SMALL_BODY read whole (one upstream write, replayable; usually
        all here already, then no await), a larger one taken off the socket where it can be,
        anything else streamed. A client waiting for 100 (Continue) gets it when its body is
        first wanted."""
        self.expects = expect_continue
        handler = self._handler
        length = self.content_length
        if length is not None and length <= SMALL_BODY and not expect_continue:
            data = self.request.content.read_nowait(length)
            return data if len(data) == length else self._rest_of_small_body(data, length)
        if length is not None and handler.splice:
            return SpliceableBody(
                self._streamed(),
                _AiohttpBodySocket(self.request),
                length,
                handler.settings.read_timeout,
                self.send_continue if expect_continue else None,
            )
        return IteratedBody(self._streamed())

    async def _client_read(
        self, content: StreamReader, read: Awaitable[bytes], loop: asyncio.AbstractEventLoop
    ) -> bytes:
        """`read` of the request body, failed with 408 after --read-timeout of client silence: a
        plain timer poisons the stream (cheaper per chunk than asyncio.timeout)."""
        timer = loop.call_later(self._handler.settings.read_timeout, _stall, content)
        try:
            return await read
        except _BodyStalled:
            raise RequestTimeout(CLIENT_STALLED) from None
        finally:
            timer.cancel()

    async def _rest_of_small_body(self, data: bytes, length: int) -> bytes:
        """The rest of a small declared body that had not all arrived with its head."""
        content = self.request.content
        try:
            return data + await self._client_read(
                content, content.readexactly(length - len(data)), asyncio.get_running_loop()
            )
        except asyncio.IncompleteReadError:
            raise BadRequest(SHORT_BODY) from None

    async def _streamed(self) -> AsyncIterator[bytes]:
        """A streamed request body. A client that stops sending for --read-timeout while we wait
        for it fails the request (408, the upstream stream cancelled); time spent waiting for
        the upstream to take what we have does not count."""
        if self.expects:
            self.send_continue()
        limit = self._handler.settings.max_body_size
        seen = 0
        request = self.request
        content = request.content
        loop = asyncio.get_running_loop()  # once: in Python 3.11 each call is a getpid() syscall
        # The socket is read only when the next chunk is wanted (released by the handler: an
        # upload cut short upstream leaves this generator suspended, not closed).
        protocol = _handler_of(request)
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

    # --- the answer ---
    @property
    def writer(self) -> ResponseWriter:
        return self._handler.writer

    async def answer_error(self, exc: ProxyError) -> None:
        self.status = exc.status
        self.error_response = response = _error_response(exc)
        if exc.closes_connection:
            response.force_close()

    def own_cancellation(self) -> ProxyError | None:
        return None  # aiohttp cancels a request's task only when its client went away

    def log_fields(self) -> tuple[str, str | None, object, str | None]:
        request = self.request
        headers = request.headers
        transport = request.transport
        return (
            request.raw_path,
            headers.get("Host"),
            transport.get_extra_info("peername") if transport else None,
            headers.get("User-Agent"),
        )


class _AiohttpBodySocket:
    """The request's connection as `h1_splice` takes a body off it (aiohttp's parser detached)."""

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._request.transport

    @property
    def lingering_time(self) -> float:
        return _handler_of(self._request).lingering_time

    def detach_body(self) -> tuple[bytes, bool, int] | None:
        content = self._request.content
        got = _handler_of(self._request).detach_body(content)
        return None if got is None else (*got, content.total_bytes)

    def reattach_body(self, complete: bool) -> None:
        _handler_of(self._request).reattach_body(self._request.content, complete)


def _handler_of(request: web.BaseRequest) -> InboundRequestHandler:
    """The request's connection protocol: ours (`compat.aiohttp`), whatever aiohttp's types say."""
    return request.protocol  # type: ignore[return-value]


def _error_response(exc: ProxyError) -> web.Response:
    headers, text = error_parts(exc)
    return web.Response(status=exc.status, text=text, headers=headers)


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
