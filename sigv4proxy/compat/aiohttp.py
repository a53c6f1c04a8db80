"""aiohttp's private API, used here and nowhere else: the inbound HTTP/1.1 connection protocol.

Owns: `InboundServer` / `InboundRequestHandler`, aiohttp's low-level server and per-connection
protocol with what the proxy needs beyond its public API: parse errors answered by the proxy's
handler (`malformed_request`), a deadline for a new connection's first request head (slowloris),
a streamed body's socket read only when the proxy wants its next chunk (`hold_reading`,
`read_more`), a body taken off the socket and given back (`detach_body`, `reattach_body`), and a
client's half-close answered before closing; and `WrittenResponse`, what aiohttp's request loop
uses of a handler's answer that the handler wrote itself. Refuses to load with an aiohttp outside
the range these were written and tested against (`versions.AIOHTTP`). Must never: be imported for
anything but these, or import anything of ours outside `compat`.
"""

from __future__ import annotations

from sigv4proxy.compat.versions import AIOHTTP as SUPPORTED

SUPPORTED.check()  # before aiohttp loads: the code below was written and tested for this range only

from aiohttp import StreamReader, web  # noqa: E402
from aiohttp.http_exceptions import HttpProcessingError  # noqa: E402
from aiohttp.web_protocol import RequestHandler, RequestPayloadError  # noqa: E402

_DETACH_PASSES = 4  # parse passes before giving up on taking a body off the socket


class InboundRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with parse errors answered by the proxy handler, a
    deadline for a new connection's first request head (aiohttp has none: slowloris) and a
    streamed body's socket read only when the proxy wants its next chunk."""

    head_timeout: float | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.head_timeout:
            self._loop.call_later(self.head_timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        if self.transport is not None and self._request_count == 0:
            self.force_close()  # not even one complete request head in time

    # While the proxy streams a request body it reads the socket only when it wants the next
    # chunk: aiohttp resumes as soon as a chunk is taken, so every upload waiting on its upstream
    # would hold a second read (up to uvloop's 256 KiB) in memory instead of in the kernel.
    reads_held = False
    _resume_held = False  # a resume asked for while held: done at the next `read_more`

    def resume_reading(self, resume_parser: bool = True) -> None:
        """aiohttp's body stream calls this on every read below its low-water mark, paused or
        not, and each call re-runs the parser on b"" (a wasted parse per request with a body).
        Nothing was held back unless reading was paused: only then is there work to resume."""
        if self._reading_paused:
            if self.reads_held:
                self._resume_held = True
            else:
                super().resume_reading(resume_parser)

    def hold_reading(self, hold: bool) -> None:
        """Defer (True) or allow again (False, doing any deferred resume) resumes of the socket."""
        self.reads_held = hold
        if not hold:
            self.read_more()

    def read_more(self) -> None:
        """The body's reader wants its next chunk: do the resume held back since the last one
        (with a parse of anything aiohttp kept unparsed while paused)."""
        if self._resume_held:
            self._resume_held = False
            if self._reading_paused:
                super().resume_reading()

    # --- a body taken straight off the socket (sigv4proxy.io.splice) ---
    def detach_body(self, content: StreamReader) -> tuple[bytes, bool] | None:
        """Everything of the current body that aiohttp has read, and whether the socket is now
        ours until `reattach_body` (False: the body was already read whole). None: not possible
        (the socket is closing, or aiohttp kept reading past several passes)."""
        transport = self.transport
        if transport is None or self._parser is None:
            return None
        parts = []
        for _ in range(_DETACH_PASSES):
            # Taking what is buffered also resumes a paused parser (aiohttp's low-water mark):
            # anything it held back unparsed is body, or comes after a body now complete.
            parts.append(content.read_nowait(-1))
            if content.is_eof():
                return b"".join(parts), False
            if not self._reading_paused:  # mid-body, every byte read so far parsed
                try:
                    self._next_parser = self._fresh_parser()
                except Exception:  # a parser this aiohttp does not build as we expect: no splice
                    return None
                transport.pause_reading()
                return b"".join(parts), True
        return None

    def reattach_body(self, content: StreamReader, complete: bool) -> None:
        """The detached body has ended: `complete`, the next request is parsed from the socket
        by a fresh parser (the old one still counts the body's bytes); otherwise the socket sits
        mid-body, so the connection closes after this answer."""
        content.feed_eof()
        if complete and self.transport is not None:
            self._parser, self._next_parser = self._next_parser, None
            self.transport.resume_reading()
        else:
            self._next_parser = None
            self.close()  # after the current answer (aiohttp resets keep-alive from the response)

    _next_parser = None

    @property
    def lingering_time(self) -> float:
        """How long aiohttp reads and drops a body its handler left unread (then closes)."""
        return self._lingering_time

    def _fresh_parser(self):
        # Built as aiohttp's RequestHandler.__init__ builds it, for the messages after the body.
        return type(self._parser)(
            self,
            self._loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=False,
            max_msg_queue_size=self._max_msg_queue_size,
        )

    def handle_error(self, request, status=500, exc=None, message=None):
        if isinstance(exc, HttpProcessingError) and request.writer.output_size == 0:
            return self._manager.request_handler.malformed_request(exc)
        return super().handle_error(request, status, exc, message)

    def eof_received(self) -> bool:  # type: ignore[override]
        """A client may half-close once its request is sent (RFC 9112 §9.6): answer what arrived
        whole, then close. aiohttp closed at once, which cancelled such requests unanswered.
        Decided one loop step later: a request just taken off the queue is then current."""
        self._loop.call_soon(self._after_client_eof)
        return True  # keep the transport open for writing meanwhile

    def _after_client_eof(self) -> None:
        if self.transport is None:
            return
        messages = getattr(self, "_messages", ())
        bodies = [payload for _, payload in messages]
        current = getattr(self, "_current_request", None)
        if current is not None:
            bodies.append(current.content)
        idle = current is None and not messages
        if idle or not all(body.is_eof() for body in bodies):
            self.force_close()  # nothing to answer, or a body cut short: close (cancels it)
        else:
            self.close()  # answer what arrived, accept nothing more, then close


class WrittenResponse:
    """A handler's answer that it wrote to the transport itself, for aiohttp's request loop
    (`RequestHandler.finish_response`, then `start`), which takes any object with `prepare` and
    `write_eof` (here: nothing left to do) and reads `keep_alive` (whether the connection takes
    another request) where it expects a `web.StreamResponse`."""

    keep_alive = False

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class InboundServer(web.Server):
    head_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        handler = InboundRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.head_timeout = self.head_timeout
        return handler
