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

    def turn(self, stream: Any, connection_window: int) -> bool:
        """May `stream` take connection window now? If not, it joins the queue (or keeps its
        place). A stream that takes part of what it needs and comes back waits at the end."""
        order = self._order
        if connection_window > 0 and (not order or next(iter(order)) is stream):
            if order:
                del order[stream]
            return True
        order.setdefault(stream)
        return False

    def leave(self, stream: Any, connection_window: int) -> None:
        """`stream` took window, waits for its own stream window instead, or ended: the next in
        line is woken if there is window left for it."""
        order = self._order
        order.pop(stream, None)
        if order and connection_window > 0:
            waiter: asyncio.Future[Any] | None = next(iter(order)).window_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._order.clear()
