"""How a serving worker uses Python's cyclic garbage collector.

Owns: freezing what start-up built out of the collector's view, the young-generation threshold,
and the periodic collection that takes its place under steady load. Must never: let cyclic
garbage (an error path's exception, traceback and frames, which may hold body chunks) wait
longer than a few seconds, or walk start-up's objects on every full collection.
"""

from __future__ import annotations

import asyncio
import gc

# CPython counts tracked allocations minus deallocations and collects generation 0 when the count
# passes 700: 64-128 requests in flight hold more than that, so under load a young collection ran
# every few milliseconds, walked live requests and promoted them (a measurable share of a worker's
# CPU: docs/performance.md). At 20,000 steady load never gets there.
GEN0_THRESHOLD = 20_000
# ...so cycles left by error paths are collected on a clock instead: the young generations every
# second (a short pause, docs/performance.md), everything every 30 s (start-up is frozen).
YOUNG_EVERY_S = 1.0
FULL_EVERY = 30


def freeze_startup_objects() -> None:
    """What start-up built (modules, botocore's endpoint tables, config, the running app) lives
    until exit: take it out of the cyclic collector's view. Otherwise every full collection walks
    all of it: stalls every couple of seconds under load that set the tail latency
    (docs/performance.md). Then raise the young threshold (see GEN0_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def collect_periodically(interval: float = YOUNG_EVERY_S, full_every: int = FULL_EVERY) -> None:
    """Runs until cancelled: generations 0-1 every `interval`, all three every `full_every`-th."""
    tick = 0
    while True:
        await asyncio.sleep(interval)
        tick += 1
        gc.collect(2 if tick % full_every == 0 else 1)
