"""The worker's garbage-collector policy (`gc_policy`): with the young threshold raised, cyclic
garbage an error path leaves (and the body chunk it may hold) is still freed within seconds, by
the periodic collection rather than by allocation counts."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from sigv4proxy.runtime import gc_policy


class _Cycle:
    """An object in a reference cycle that holds a large buffer, as a traceback's frames may."""

    def __init__(self) -> None:
        self.me = self
        self.chunk = bytearray(1 << 20)


@pytest.fixture
def no_automatic_collection():
    """Only explicit collections run during the test (as under steady load at 20,000)."""
    saved = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**9, 10**9, 10**9)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


async def _freed_within(ref: weakref.ref, seconds: float) -> bool:
    for _ in range(int(seconds / 0.01)):  # bounded
        if ref() is None:
            return True
        await asyncio.sleep(0.01)
    return ref() is None


@pytest.mark.parametrize("age", ["young", "promoted to the oldest generation"])
async def test_cyclic_garbage_is_collected_on_the_clock(no_automatic_collection, age):
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    if age != "young":
        gc.collect()  # survives while referenced: now in generation 2
    del cycle
    await asyncio.sleep(0.2)
    assert ref() is not None, "nothing collects it without the periodic task"
    task = asyncio.create_task(gc_policy.collect_periodically(interval=0.02, full_every=5))
    try:
        assert await _freed_within(ref, 2.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_freeze_raises_the_young_threshold_and_keeps_the_older_ones():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc_policy.freeze_startup_objects()
        assert gc.get_threshold() == (gc_policy.GEN0_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
