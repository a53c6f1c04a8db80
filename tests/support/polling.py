"""Waiting for something another task or process does, bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """True as soon as `predicate()` holds, polled every `interval` s; its last value after `timeout` s."""
    for _ in range(int(timeout / interval)):
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def eventually_sync(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.1) -> bool:
    """`eventually` for blocking code (a container's state, a port on the host)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
