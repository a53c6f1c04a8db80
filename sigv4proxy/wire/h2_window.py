"""Fair sharing of one HTTP/2 connection's send window among the streams waiting for it.

Owns: the arrival order of streams waiting for connection window and who may take it next.
Used by both upstream clients and the inbound HTTP/2 server. Must never: decide how much a stream
sends, or wake anything but a waiting stream's `window_waiter`.
"""

from __future__ import annotations

import asyncio
from typing import Any


class WindowQueue:
    """Streams waiting for connection send window, in the order they started waiting.

    Without it every window opening woke all waiters and whichever ran first took the window, so
    under steady load one stream could lose every round for as long as the load lasted (and,
    since each wake restarted its timeout, never time out): the soak saw requests hang 30 s+.
    """

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: dict[Any, None] = {}  # an ordered set

    def __bool__(self) -> bool:
        return bool(self._order)

    def may_send(self, stream: Any, window: int, connection_window: int) -> bool:
        """May `stream` send now? `window` is what it could send (the smaller of its own window and
        the connection's). A stream whose own window is shut leaves the queue (it waits for the
        peer, not its turn); one that must wait for its turn joins the queue or keeps its place.
        True means `window` > 0 and the stream is first in line (no longer queued): one that
        sends part of what it has and comes back waits at the end."""
        order = self._order
        if connection_window > 0 and window <= 0:
            self.leave(stream, connection_window)
            return False
        if connection_window > 0 and (not order or next(iter(order)) is stream):
            if order:
                del order[stream]
            return True
        order.setdefault(stream)
        return False

    def sent(self, connection_window: int) -> None:
        """After a send: window left over goes to the next in line."""
        if self._order and connection_window > 0:
            self._wake_first()

    def leave(self, stream: Any, connection_window: int) -> None:
        """`stream` waits for its own window instead, or ended: the next in line is woken if there
        is window left for it."""
        order = self._order
        order.pop(stream, None)
        if order and connection_window > 0:
            self._wake_first()

    def _wake_first(self) -> None:
        waiter: asyncio.Future[Any] | None = next(iter(self._order)).window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def clear(self) -> None:
        self._order.clear()
