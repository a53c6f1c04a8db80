"""What every upstream connection class shares: write backpressure, the life-cycle state, the idle clock.

Owns: `WriteFlow` (transport pause/resume_writing as an awaitable with a bound), `ConnState` (a
connection's life cycle and its allowed transitions), `ConnectionCore` (identity, transport,
state, idle and age timers and the Connection answers that follow from them, for HTTP/1.1 and
both HTTP/2 classes) and `feed_body` (a request body handed to a sender chunk by chunk, failures
as typed errors). Must never: parse or frame a protocol, touch h2 state, or log header values.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from enum import Enum

from sigv4proxy.compat.mypyc import mypyc_attr
from sigv4proxy.errors import BadRequest, ProxyError, UpstreamTimeout
from sigv4proxy.model import Origin, Timeouts
from sigv4proxy.upstream.base import OnChange

AGE_JITTER = 0.1  # connections retire at a random 90-100 % of Timeouts.max_age


class WriteFlow:
    """Transport write backpressure as an awaitable (pause_writing/resume_writing)."""

    __slots__ = ("_paused", "_waiters", "_error")

    def __init__(self) -> None:
        self._paused = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._error: BaseException | None = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def fail(self, error: BaseException) -> None:
        self._error = error
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)

    async def drain(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        if not self._paused:
            return
        await self._wait(asyncio.get_running_loop(), timeout)

    async def _wait(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        fut = loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise UpstreamTimeout("upstream stopped reading") from None


class SerialWriteFlow(WriteFlow):
    """Writers get past a resume one at a time: the first waiter is woken, the next only after it
    has written and the transport is still not paused. For TLS, where a write is encrypted and
    buffered at once: waking every waiter let each HTTP/2 stream add a chunk (64 uploads on one
    connection, megabytes per resume; the memory this saves: docs/performance.md)."""

    __slots__ = ()

    def resume(self) -> None:
        self._paused = False
        self._wake_next()

    def _wake_next(self) -> None:
        waiters = self._waiters
        while waiters and not self._paused:
            fut = waiters.popleft()
            if not fut.done():  # not timed out
                fut.set_result(None)
                return

    async def drain(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        if not self._paused and not self._waiters:
            return
        loop = asyncio.get_running_loop()
        if not self._paused:  # others queued first: our turn comes in order
            loop.call_soon(self._wake_next)
        await self._wait(loop, timeout)
        if self._waiters:  # the next one goes after our write, unless it paused the transport
            loop.call_soon(self._wake_next)


class ConnState(Enum):
    """Where an upstream connection is in its life. Only READY takes new requests; the state
    changes in `ConnectionCore._enter` alone, along the arrows in `_NEXT` (anything else is
    ignored: a connection going away stays so when its age comes, a closed one stays closed)."""

    OPENING = "opening"  # the transport is up; HTTP/2: SETTINGS not yet exchanged both ways
    READY = "ready"
    RETIRING = "retiring"  # past its max age: takes nothing new, we close it once its work is done
    GOING_AWAY = "going away"  # HTTP/2: the peer's GOAWAY; closes once the streams it kept end
    CLOSED = "closed"


OPENING, READY, RETIRING, GOING_AWAY, CLOSED = ConnState
_NEXT: dict[ConnState, frozenset[ConnState]] = {
    OPENING: frozenset((READY, RETIRING, GOING_AWAY, CLOSED)),
    READY: frozenset((RETIRING, GOING_AWAY, CLOSED)),
    RETIRING: frozenset((GOING_AWAY, CLOSED)),
    GOING_AWAY: frozenset((CLOSED,)),
    CLOSED: frozenset(),
}


@mypyc_attr(allow_interpreted_subclasses=True)  # the HTTP/2 connections subclass it in Python
class ConnectionCore:
    """What every upstream connection shares: identity, loop, write flow, state, idle clock.

    `state` and `loop` are read by anyone; `state` is written by `_enter` only. Subclasses define
    `is_idle()`, `_idle_expired()` and `_retire_when_done()`, and are their transport's protocol
    (the loop calls its methods by name; the compiled HTTP/1.1 class has no asyncio.Protocol base).
    """

    def __init__(self, origin: Origin, timeouts: Timeouts, on_change: OnChange) -> None:
        self.origin = origin
        self.timeouts = timeouts
        self._on_change = on_change
        self.loop = asyncio.get_running_loop()
        self.state = OPENING
        self._transport: asyncio.Transport | None = None
        self._flow = SerialWriteFlow() if origin.scheme == "https" else WriteFlow()
        self._idle_since = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        # Past its age (Timeouts.max_age) a connection takes nothing new and closes once its work
        # is done: ours retire before the server's cut, at a spread so workers and pods do not
        # all reconnect at once.
        self._age_timer: asyncio.TimerHandle | None = None
        if timeouts.max_age:
            self._age_timer = self.loop.call_later(
                timeouts.max_age * (1 - AGE_JITTER * random.random()), self._age_reached
            )

    def _enter(self, state: ConnState) -> bool:
        """The one place `state` changes; False (and no change) if `_NEXT` has no such arrow."""
        if state not in _NEXT[self.state]:
            return False
        self.state = state
        return True

    def is_idle(self) -> bool:
        raise NotImplementedError

    def _retire_when_done(self) -> None:
        """The age was reached: close now if nothing is in flight, else when the last of it ends."""
        raise NotImplementedError

    def _age_reached(self) -> None:
        self._age_timer = None
        if self._enter(RETIRING):
            self._retire_when_done()
            self._on_change(self)  # the pool stops offering it

    def is_closed(self) -> bool:
        return self.state is CLOSED

    def has_expired(self, now: float) -> bool:
        return self.is_idle() and now - self._idle_since > self.timeouts.idle

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    def _idle_expired(self) -> None:
        """Called by the idle timer on a connection idle (and open) for the whole timeout."""
        raise NotImplementedError

    # The idle timer is lazy: going idle stamps the time and starts a timer only if none is
    # pending; going busy leaves it. When it fires it closes a connection idle long enough, or
    # waits out the rest. Per request that is a store, not a timer created and cancelled.
    def _arm_idle_timer(self) -> None:
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeouts.idle, self._idle_check)

    def _stop_idle_timer(self) -> None:
        """Closing: no timer outlives the connection."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.state is CLOSED or not self.is_idle():
            return  # busy: arming again when it next goes idle
        self._idle_timer = self._timer_until(self._idle_since + self.timeouts.idle, self._idle_check)
        if self._idle_timer is None:
            self._idle_expired()

    def _timer_until(self, deadline: float, callback: Callable[[], None]) -> asyncio.TimerHandle | None:
        """A lazy timer's re-arm: `callback` at loop time `deadline`, or None if that has passed."""
        left = deadline - self.loop.time()
        return self.loop.call_later(left, callback) if left > 0 else None

    def _close_transport(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


async def feed_body(
    body: bytes | bytearray | memoryview | AsyncIterable[bytes],
    send: Callable[[bytes | bytearray | memoryview], Awaitable[None]],
) -> None:
    """Passes a request body to `send` chunk by chunk (empty chunks skipped), as typed errors.

    A body that cannot be iterated or whose iterator fails becomes BadRequest; a ProxyError from
    the iterator (the inbound side timed out, say) passes through unchanged.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        await send(body)
        return
    try:
        iterator = body.__aiter__()
    except Exception:
        raise BadRequest("request body is not iterable") from None
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except ProxyError:
            raise
        except Exception:
            raise BadRequest("request body could not be read") from None
        if chunk:
            await send(chunk)
