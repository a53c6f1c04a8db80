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
