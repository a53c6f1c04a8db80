"""What an HTTP/2 client connection means to the pool, whichever engine speaks the protocol.

Owns: the stream states (`StreamState`, RFC 9113 §5.1, and the one place they change), the stream
table and what follows from it (idle, active streams, the served count, the idle timer), the
connection's HTTP/2 life cycle (SETTINGS exchanged, GOAWAY, retiring, connection lost), waiting
for a response head within the first-byte timeout, 1xx and Expect: 100-continue, keep-alive
PINGs, what a valid `:status` is, and how a peer's RST_STREAM or GOAWAY maps to our typed errors
(which the pool's retries read). The engines (`lean_h2.LeanH2Connection`, our own framing;
`http2.H2Connection`, the `h2` library) own the protocol state and the bytes: `is_available`,
`handle_request`, `reset`, `_send_ping`, `_send_goaway` and the receiving side, and report what
the peer did through `_move`, `_peer_reset`, `_peer_goaway`, `_interim`, `_check_ready`.
Must never: touch h2 state or frame bytes, write to the socket, or log header values.
"""

from __future__ import annotations

import asyncio
from collections import deque

from sigv4proxy.compat.mypyc import mypyc_attr
from sigv4proxy.errors import (
    ProxyError,
    RetryableStreamError,
    UnansweredReset,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
)
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.base import (
    EventWait,
    Interim,
    OnChange,
    Response,
    hold_for_continue,
    wake,
)
from sigv4proxy.upstream.connection_core import (
    CLOSED as CONNECTION_CLOSED,
)
from sigv4proxy.upstream.connection_core import (
    GOING_AWAY,
    READY,
    RETIRING,
    ConnectionCore,
)
from sigv4proxy.wire.h2_window import WindowQueue

CANCEL = 0x8  # RFC 9113 error codes used here (h2's ErrorCodes are the same integers)
REFUSED_STREAM = 0x7


def status_code(value: bytes | None) -> int:
    """A response's `:status` as a number, or 0 when it is not three digits from 100 to 599
    (RFC 9110 §15: anything else is invalid; a client treats it as a server error)."""
    code = int(value) if value is not None and len(value) == 3 and value.isdigit() else 0
    return code if 100 <= code <= 599 else 0


class StreamState:
    """A stream's state as RFC 9113 §5.1 names it, for a client that never enables push: our
    HEADERS open it (OPEN, or HALF_CLOSED_LOCAL when they also end the request), so "idle" and
    the reserved states never show. Closed comes in two kinds a reader must tell apart: CLOSED
    once the response had ended (what it sent stays readable) and ABORTED before that (reset by
    either side, not processed before a GOAWAY, cut with the connection: `error` says which,
    unless the consumer closed it itself). Each of the five carries the answers the hot path asks
    (`remote_ended`, `closed`) and its successors (`_TABLE`), so a check or a move is one
    attribute read. Five constants compared by identity, not an Enum: compiled, an Enum member
    with an `__init__` of its own is refused."""

    def __init__(self, label: str, remote_ended: bool, closed: bool) -> None:
        self.label = label
        self.remote_ended = remote_ended  # the response ended: no more of it will come
        self.closed = closed  # out of the connection's stream table
        self.on_local_end = self  # filled in from _TABLE
        self.on_remote_end = self
        self.on_cut = self

    def __repr__(self) -> str:
        return f"<StreamState {self.label}>"


OPEN = StreamState("open", False, False)
HALF_CLOSED_LOCAL = StreamState("half-closed (local)", False, False)
HALF_CLOSED_REMOTE = StreamState("half-closed (remote)", True, False)
CLOSED = StreamState("closed", True, True)
ABORTED = StreamState("closed before its response ended", False, True)
# state: (our END_STREAM went out, the peer's END_STREAM came, reset / refused / connection lost).
# Closed is final; a half-closed side cannot end twice (the engines refuse such a frame first).
_TABLE = {
    OPEN: (HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE, ABORTED),
    HALF_CLOSED_LOCAL: (HALF_CLOSED_LOCAL, CLOSED, ABORTED),
    HALF_CLOSED_REMOTE: (CLOSED, HALF_CLOSED_REMOTE, CLOSED),
    CLOSED: (CLOSED, CLOSED, CLOSED),
    ABORTED: (ABORTED, ABORTED, ABORTED),
}
for _state, (_local, _remote, _cut) in _TABLE.items():
    _state.on_local_end, _state.on_remote_end, _state.on_cut = _local, _remote, _cut


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 library's stream subclasses it in Python
class H2StreamBase(EventWait):
    """One request/response exchange on either HTTP/2 client: its state, the response as it
    arrives, and its event wait. Also the `ResponseBody` the Response reads from (the engine's
    subclass defines `take`)."""

    __slots__ = (
        "id",
        "state",
        "status",
        "headers",
        "trailers",
        "chunks",
        "sent_at",
        "error",
        "send_task",
        "unacked",
        "window_waiter",
        "interim",
        "continue_waiter",
    )

    def __init__(
        self, conn: H2ConnectionBase, stream_id: int, interim: Interim | None = None, state: StreamState = OPEN
    ) -> None:
        self.conn = conn
        self.id = stream_id
        self.state = state  # moved by `H2ConnectionBase._move` only
        self.interim = interim  # where 1xx responses go
        self.continue_waiter: asyncio.Future[bool] | None = None  # an upload held for Expect
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.chunks: deque = deque()  # received body parts, in the subclass's unit
        self.sent_at = 0.0
        self.error: ProxyError | None = None
        self.send_task: asyncio.Task[None] | None = None
        self.unacked = 0  # handed to the consumer, credit not yet returned
        self.waiter: asyncio.Future[bool] | None = None
        self.window_waiter: asyncio.Future[bool] | None = None

    @property
    def complete(self) -> bool:
        return self.state.remote_ended and not self.chunks and self.error is None

    @property
    def ready(self) -> bool:
        return bool(self.chunks) or self.state.remote_ended or self.error is not None

    async def read(self) -> bytes:
        conn = self.conn
        while True:
            data = self.take()
            if data is not None:
                return data
            if not await self.wait_event(conn.timeouts.read):
                conn.fail_stream(self, UpstreamTimeout("upstream response body stalled"))

    def _nothing_here(self) -> bytes | None:
        """`take` with no chunk buffered: the body's error raised, b"" at its end, else None."""
        if self.error is not None:
            raise self.error
        return b"" if self.state.remote_ended else None

    # --- the subclass's part: chunks and receive credit in its own unit ---
    def take(self) -> bytes | None:
        """The next chunk (b"" at the end, a typed error raised) if it is here, else None."""
        raise NotImplementedError

    def _buffered_credit(self) -> int:
        """Receive credit held by chunks not yet handed to the consumer."""
        raise NotImplementedError

    def _return_credit(self, size: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the upload, reset the stream if still open, return credit for unread data."""
        if self.send_task is not None and not self.send_task.done():
            self.send_task.cancel()
        if not self.state.closed:
            self.conn.reset(self, CANCEL)
        pending = self.unacked + (self._buffered_credit() if self.chunks else 0)
        self.chunks.clear()
        self.unacked = 0
        if pending:
            self._return_credit(pending)


@mypyc_attr(allow_interpreted_subclasses=True)  # both engines subclass it in Python
class H2ConnectionBase(ConnectionCore):
    """Stream table, stream and connection states, and error mapping shared by both HTTP/2
    client connections (the connection's `state` is `connection_core.ConnState`)."""

    http_version = "HTTP/2"

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: OnChange) -> None:
        super().__init__(origin, timeouts, on_change)
        self._streams: dict[int, H2StreamBase] = {}
        self._ready: asyncio.Future[bool] = self.loop.create_future()
        # the two halves of the SETTINGS exchange that take the connection from OPENING to READY
        self._remote_settings_seen = False
        self._local_settings_acked = False
        self._served = 0  # streams answered in full (a connection that served is a reused one)
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._ping_payload = b""
        self._pings_sent = 0
        # One lazy timer bounds every stream's wait for its response head (see _check_heads).
        self._head_timer: asyncio.TimerHandle | None = None
        # Uploads waiting for the shared connection send window take it in turn.
        self._window_queue = WindowQueue()

    # --- the subclass's part ---
    def _send_ping(self, payload: bytes) -> None:
        """Queue and flush PING(payload); no error escapes."""
        raise NotImplementedError

    def reset(self, stream: H2StreamBase, code: int) -> None:
        """RST_STREAM(code) if the stream is still open, then `_retire` it."""
        raise NotImplementedError

    def _send_goaway(self) -> None:
        """Queue and flush GOAWAY(NO_ERROR); no error escapes."""
        raise NotImplementedError

    # --- the Connection interface ---
    def is_idle(self) -> bool:
        return self.state is not CONNECTION_CLOSED and not self._streams

    def active_streams(self) -> int:
        return len(self._streams)

    async def wait_ready(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                ok = await asyncio.shield(self._ready)
        except TimeoutError:
            self._close_transport()
            raise UpstreamTimeout("HTTP/2 settings exchange timed out") from None
        if not ok:
            raise UpstreamConnectError("connection closed during HTTP/2 setup")

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """GOAWAY(NO_ERROR), close the socket, fail whatever is still open."""
        if self.state is CONNECTION_CLOSED:
            return
        self._send_goaway()
        self._close_transport()
        self._lost(UpstreamReset("upstream connection closed"))

    # --- stream states: every move of `H2StreamBase.state` is `_move`, along `_TABLE` ---
    def _move(self, stream: H2StreamBase, state: StreamState) -> None:
        """`stream` takes `state` (closed is final). A stream that closes leaves the table, counted
        as served if its response had ended; the connection's last one idles it, or closes it
        when it is retiring or going away."""
        if stream.state.closed:
            return
        stream.state = state
        if not state.closed:
            return
        if state is CLOSED:
            self._served += 1
        streams = self._streams
        streams.pop(stream.id, None)
        connection = self.state
        if connection is CONNECTION_CLOSED:
            return  # `_lost` is closing them all, and reports once
        if not streams:
            if connection is GOING_AWAY:
                self._close_transport()
            elif connection is RETIRING:
                self.close()  # past its age: our GOAWAY, then the close
            else:
                self._arm_idle_timer()
        self._on_change(self)

    def end_local(self, stream: H2StreamBase) -> None:
        """Our END_STREAM went out (the request is whole): the first-byte clock starts."""
        stream.sent_at = self.loop.time()
        self._move(stream, stream.state.on_local_end)
        stream.wake()

    def _retire(self, stream: H2StreamBase) -> None:
        """Reset (either way) or refused: the stream leaves the table now."""
        self._move(stream, stream.state.on_cut)

    # --- request side ---
    async def _await_response(self, stream: H2StreamBase) -> Response:
        """The response once its head arrived; on any failure the stream is closed first."""
        try:
            while stream.status is None:
                if stream.error is not None:
                    raise stream.error
                # While uploading, the send task bounds every network wait; once the request is
                # sent, the connection's head timer does.
                if stream.state is HALF_CLOSED_LOCAL and self._head_timer is None:
                    self._head_timer = self._timer_until(stream.sent_at + self.timeouts.first_byte, self._check_heads)
                    if self._head_timer is None:
                        self.fail_stream(stream, UpstreamTimeout("no upstream response in time"))
                        continue
                # Inline rather than wait_event(): each level of coroutines is walked again at
                # every wake-up.
                stream.waiter = waiter = self.loop.create_future()
                try:
                    await waiter
                finally:
                    stream.waiter = None
        except BaseException:
            stream.close()
            raise
        status: int = stream.status
        return Response(status, stream.headers, self.http_version, stream)

    def _check_heads(self) -> None:
        """The head timer: fails the streams sent longer than --first-byte-timeout ago without a
        response head, and re-arms for the earliest deadline left. Streams share one first-byte
        timeout, so a pending timer fires no later than a newer stream's deadline: per request
        that is no timer made and cancelled."""
        self._head_timer = None
        if self.state is CONNECTION_CLOSED:
            return
        now = self.loop.time()
        earliest = None
        for stream in list(self._streams.values()):
            if stream.status is not None or stream.state is not HALF_CLOSED_LOCAL or stream.error is not None:
                continue
            deadline = stream.sent_at + self.timeouts.first_byte
            if deadline <= now:
                self.fail_stream(stream, UpstreamTimeout("no upstream response in time"))
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None and self.state is not CONNECTION_CLOSED:
            self._head_timer = self._timer_until(earliest, self._check_heads)

    async def hold_upload(self, stream: H2StreamBase) -> bool:
        """Expect: 100-continue: False when the upstream answered without wanting the body."""
        return await hold_for_continue(stream, self.loop, self.timeouts.expect_continue)

    def _interim(self, stream: H2StreamBase, code: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx response: a 100 releases a held upload; each goes to the stream's `interim`."""
        if code == 100:
            wake(stream.continue_waiter)
        if stream.interim is not None:
            try:
                stream.interim(code, headers)
            except ProxyError as err:
                self.fail_stream(stream, err)

    def fail_stream(self, stream: H2StreamBase, err: ProxyError, code: int = CANCEL) -> None:
        """Our end of a stream: `err` is its outcome (unless its response had ended), RST_STREAM."""
        if stream.error is None and not stream.state.remote_ended:
            stream.error = err
        self.reset(stream, code)
        stream.wake()
        wake(stream.window_waiter)
        wake(stream.continue_waiter)

    def _idle_expired(self) -> None:
        self.close()

    def _retire_when_done(self) -> None:
        if not self._streams:
            self.close()

    # --- what the peer tells us ---
    def _check_ready(self) -> None:
        if self._remote_settings_seen and self._local_settings_acked and self._enter(READY):
            self._ready.set_result(True)
            self._on_change(self)

    def _peer_reset(self, stream: H2StreamBase, code: int, code_name: object) -> None:
        """The peer's RST_STREAM: refused streams may be retried; a completed response stands."""
        err: ProxyError | None
        if code == REFUSED_STREAM:
            err = RetryableStreamError("upstream refused the stream")
        elif stream.state.remote_ended:
            err = None  # response complete; the peer only stops our upload
        else:
            err = UpstreamReset(f"upstream reset the stream ({code_name})")
        if err is not None and stream.error is None:
            stream.error = err
        self._retire(stream)
        stream.wake()
        wake(stream.window_waiter)
        wake(stream.continue_waiter)

    def _peer_goaway(self, last_stream_id: int, error_code: int) -> None:
        """No new streams; those above `last_stream_id` were never processed: retry elsewhere."""
        self._enter(GOING_AWAY)
        for stream in list(self._streams.values()):
            if stream.id > last_stream_id:
                stream.error = RetryableStreamError("stream not processed before GOAWAY", "goaway")
                self._retire(stream)
                stream.wake()
                wake(stream.window_waiter)
                wake(stream.continue_waiter)
        if not self._ready.done():
            self._ready.set_result(False)
        if not self._streams:
            self._close_transport()
        self._on_change(self)

    # --- liveness: a PING on idle pooled connections, so a dead peer is found before reuse ---
    def _arm_idle_timer(self) -> None:
        super()._arm_idle_timer()
        if self.timeouts.ping and self._ping_timer is None:
            self._ping_timer = self.loop.call_later(self.timeouts.ping, self._keepalive_ping)

    def _stop_idle_timer(self) -> None:
        super()._stop_idle_timer()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _keepalive_ping(self) -> None:
        """Lazy, like the idle timer: busy means streams prove liveness (an ACK still awaited
        stays awaited); idle for less than the interval waits out the rest."""
        self._ping_timer = None
        if self.state is CONNECTION_CLOSED or self._streams:
            return
        self._ping_timer = self._timer_until(self._idle_since + self.timeouts.ping, self._keepalive_ping)
        if self._ping_timer is not None:
            return
        self._pings_sent += 1
        self._ping_payload = self._pings_sent.to_bytes(8, "big")
        self._send_ping(self._ping_payload)
        if self._ping_deadline is None:
            self._ping_deadline = self.loop.call_later(self.timeouts.connect, self._ping_unanswered)
        self._ping_timer = self.loop.call_later(self.timeouts.ping, self._keepalive_ping)

    def _on_ping_ack(self, payload: bytes) -> None:
        if payload == self._ping_payload and self._ping_deadline is not None:
            self._ping_deadline.cancel()
            self._ping_deadline = None

    def _ping_unanswered(self) -> None:
        self._ping_deadline = None
        if self.state is not CONNECTION_CLOSED:
            self._close_transport()
            self._lost(UpstreamReset("upstream did not answer PING"))

    # --- asyncio.Protocol ---
    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamReset("upstream connection lost"))

    def _lost(self, err: ProxyError) -> None:
        if not self._enter(CONNECTION_CLOSED):
            return
        self._stop_idle_timer()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._ping_deadline is not None:
            self._ping_deadline.cancel()
            self._ping_deadline = None
        self._flow.fail(err)
        if not self._ready.done():
            self._ready.set_result(False)
        # On a connection that had answered before, a stream with no answer yet met its close
        # (most likely the upstream's idle close crossing our reuse): retried where that is safe.
        unanswered = UnansweredReset(err.reason) if type(err) is UpstreamReset and self._served else err
        for stream in list(self._streams.values()):
            if stream.error is None and not stream.state.remote_ended:
                stream.error = unanswered if stream.status is None else err
            self._retire(stream)
            stream.wake()
            wake(stream.window_waiter)
            wake(stream.continue_waiter)
        self._window_queue.clear()
        self._on_change(self)
