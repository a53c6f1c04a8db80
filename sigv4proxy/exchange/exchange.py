"""The one request path of every inbound protocol: admission → prepare (route, credentials, sign)
→ pool → relay through the inbound side's responder → one error path → one observation.

Owns: the in-flight count and its limit (--max-inflight), the call into the pool with the
request's body (a kind `upstream.body` declares, which the inbound side builds) and its 1xx hook,
what a broken answer becomes (nothing sent yet: the proxy's typed answer; something sent: the
responder cuts it the way its protocol says), the stage timings handed to metrics, the access-log
line (the same fields for every protocol) and the content of the proxy's own error answers
(`error_parts`). The inbound adapters (`inbound.h1`, `inbound.h2`) each hand in an `Inbound`: the
request as it arrived and the means to answer it. Must never: forward a request unsigned, know an
inbound protocol's framing, put a secret or header value in an error body or log, or log per
request above debug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sigv4proxy.errors import Overloaded, ProxyError
from sigv4proxy.exchange.prepare import RequestPreparer
from sigv4proxy.model import Origin
from sigv4proxy.observe import accesslog
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.upstream.base import Body, Interim, Response
from sigv4proxy.upstream.body import IteratedBody, SocketBody, StreamedBody

# What an inbound adapter hands in (the body kinds the upstream declares) and gets to relay (the
# upstream's response): part of this module's interface, so the inbound layer needs no upstream.
__all__ = [
    "ERROR_HEADER",
    "Body",
    "Exchange",
    "ExchangeSettings",
    "Inbound",
    "IteratedBody",
    "Response",
    "SocketBody",
    "StreamedBody",
    "Upstream",
    "error_parts",
]

log = logging.getLogger("sigv4proxy.exchange")

ERROR_HEADER = "x-sigv4proxy-error"
Fields = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ExchangeSettings:
    """What the exchange takes from the config (derived once, at start)."""

    max_inflight: int | None = None  # more at once: 503 overloaded at once, no queue
    access_log: bool = False  # one JSON line per request


class Inbound(Protocol):
    """One request as an inbound adapter received it, and the means to answer it."""

    # Read-only to the exchange: an adapter may keep each as an attribute or a property.
    @property
    def method(self) -> str: ...
    @property
    def authority(self) -> str | None:
        """The absolute-form authority (HTTP/1.1) or :authority (HTTP/2)."""

    @property
    def target(self) -> str:
        """Origin-form path?query."""

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def has_body(self) -> bool: ...
    @property
    def from_h2(self) -> bool:
        """HTTP/2 field rules apply (cookie crumbs, te: trailers)."""

    @property
    def protocol(self) -> str:
        """ "HTTP/1.1" | "HTTP/2", for the access log."""

    @property
    def refusal(self) -> ProxyError | None:
        """Refused by the inbound parser (malformed): answered, never forwarded."""

    @property
    def started(self) -> bool:
        """A byte of the answer went out: from then on an error can only cut it."""

    @property
    def body_bytes(self) -> int:
        """Body bytes of the answer sent so far."""

    def original_destination(self) -> tuple[str, int] | None: ...

    def body(self, expect_continue: bool) -> Body | Awaitable[Body]:
        """The request body as a kind the pool takes (bytes, streamed, or off the socket), or
        an awaitable of it when some of it must be waited for."""
        ...

    def interim(self, status: int, headers: Fields) -> None:
        """An upstream 1xx response, forwarded (called from the upstream's receive path)."""
        ...

    def relay(self, upstream: Response) -> Awaitable[None]:
        """Writes the answer; raises ProxyError if the upstream breaks it, ConnectionError if the
        client is gone."""
        ...

    async def answer_error(self, exc: ProxyError) -> None:
        """The proxy's own answer to `exc` (nothing of the upstream's answer was sent)."""
        ...

    def cut(self, exc: ProxyError | None) -> None:
        """End an answer that broke after it started (`exc`), or whose client went away (None)."""
        ...

    def own_cancellation(self) -> ProxyError | None:
        """The request's task was cancelled: by the inbound side on purpose (then the error to
        answer with, the cancellation taken back), or because the client went away (None)."""
        ...

    def log_fields(self) -> tuple[str, str | None, object, str | None]:
        """(path as received, Host, peer address, User-Agent) for the access log."""
        ...


def error_parts(exc: ProxyError) -> tuple[dict[str, str], str]:
    """Headers and body text of the proxy's own answer to a typed error (fixed reason, no secret)."""
    # Server names the answerer without a library's default, which gives away software versions
    headers = {ERROR_HEADER: exc.kind, "Content-Type": "text/plain; charset=utf-8", "Server": "sigv4proxy"}
    if exc.status == 503:
        headers["Retry-After"] = "1"
    return headers, f"sigv4proxy: {exc.reason}\n"


class Upstream(Protocol):
    """Where the exchange sends a signed request: the worker's `ConnectionPool`, or anything that
    forwards to it (a test's recorder: a compiled pool's methods cannot be wrapped in place)."""

    def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: Body = None,
        interim: Interim | None = None,
        expect_continue: bool = False,
    ) -> Awaitable[Response]: ...


class Exchange:
    """The request path; one per worker, shared by every inbound connection."""

    def __init__(
        self, preparer: RequestPreparer, upstream: Upstream, metrics: Metrics, settings: ExchangeSettings
    ) -> None:
        self._prepare = preparer.prepare
        self.upstream = upstream
        self._metrics = metrics
        self._max_inflight = settings.max_inflight
        self._access_log = settings.access_log
        self.inflight = 0  # requests in progress, every protocol (gauge, admission, drain)

    async def run(self, inbound: Inbound) -> None:
        started = time.perf_counter()
        self.inflight += 1
        route, status, failure = "none", 0, None
        to_target: float | None = None
        upstream_protocol: str | None = None
        try:
            try:
                if self._max_inflight is not None and self.inflight > self._max_inflight:
                    raise Overloaded("too many requests in flight")
                if inbound.refusal is not None:
                    raise inbound.refusal
                prepared = self._prepare(
                    inbound.method,
                    inbound.authority,
                    inbound.target,
                    inbound.raw_headers,
                    inbound.content_length,
                    inbound.original_destination(),
                    inbound.from_h2,
                )
                target = prepared.route
                route = target.name
                body = inbound.body(prepared.expect_continue) if inbound.has_body else None
                if body is not None and not isinstance(body, (bytes, StreamedBody)):
                    body = await body  # a small body's rest still on its way
                expect = prepared.expect_continue and isinstance(body, StreamedBody)
                upstream = await self.upstream.request(
                    target.origin,
                    inbound.method.encode("ascii"),
                    inbound.target.encode("latin-1"),
                    target.authority_bytes,
                    prepared.headers,
                    body,
                    inbound.interim,
                    expect,
                )
            except asyncio.CancelledError:
                own = inbound.own_cancellation()
                if own is None:
                    failure = "client_disconnect"
                    self._metrics.errors_for(failure).inc()
                    raise
                raise own from None
            first_byte = time.perf_counter()
            to_target = first_byte - prepared.sign_done
            upstream_protocol = upstream.http_version
            try:
                await inbound.relay(upstream)
                status = upstream.status
            except ProxyError as exc:
                if not inbound.started:
                    raise  # nothing sent yet: the client gets the typed error answer
                log.debug("response aborted mid-body: %s", exc.kind)
                failure = "response_aborted"
                self._metrics.errors_for(exc.kind).inc()
                inbound.cut(exc)
            except ConnectionError:
                failure = "client_disconnect"
                self._metrics.errors_for(failure).inc()
                inbound.cut(None)
            finally:
                upstream.close()  # resets the upstream stream unless it completed
            self._metrics.observe_request(
                inbound.method,
                status,
                route,
                time.perf_counter() - started,
                prepared.sign_done - prepared.sign_started,
                to_target,
                upstream_protocol,
            )
        except ProxyError as exc:
            status, failure = exc.status, exc.kind
            self.refused(exc)
            self._metrics.observe_request(inbound.method, exc.status, route, time.perf_counter() - started)
            try:
                await inbound.answer_error(exc)
            except ConnectionError:
                pass  # the client is gone: nobody to answer
        finally:
            self.inflight -= 1
            if self._access_log:
                elapsed = time.perf_counter() - started
                path, host, peer, user_agent = inbound.log_fields()
                accesslog.record(
                    start=time.time() - elapsed,
                    method=inbound.method,
                    path=path,
                    host=host,
                    peer=peer,
                    user_agent=user_agent,
                    status=status,
                    duration=elapsed,
                    to_target=to_target,
                    route=route,
                    upstream_protocol=upstream_protocol,
                    bytes_sent=inbound.body_bytes,
                    failure=failure,
                    protocol=inbound.protocol,
                )

    def refused(self, exc: ProxyError) -> None:
        """Counts a request answered with a typed error (also one an inbound parser refused
        before it became a request); logged at debug only (clients cause most)."""
        self._metrics.errors_for(exc.kind).inc()
        log.debug("request failed: %s (%s)", exc.kind, exc.reason)
