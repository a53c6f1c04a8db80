"""prometheus_client's internals, used here and nowhere else: a histogram child's bounds, adding a
batch of observations to its sum and bucket counters, and reading the workers' files.

Owns: `histogram_bounds` and `add_to_histogram`, which `observe.metrics.LocalHistogram` uses to
accumulate a child's observations in the worker and write them in one batch (docs/performance.md),
and `WorkerFilesCollector`. Must never: add a count to another bucket than `Histogram.observe`
would, fail a scrape over a worker starting, or import anything of ours outside `compat`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

from sigv4proxy.compat.versions import PROMETHEUS_CLIENT as SUPPORTED

SUPPORTED.check()  # before prometheus_client loads: the code below was written and tested for this range only

from prometheus_client import Histogram  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

_USED_FIELD = 8  # a file's first bytes: how much of it is in use (prometheus_client's mmap_dict)


def histogram_bounds(child: Histogram) -> tuple[float, ...]:
    """The child's bucket upper bounds in its buckets' order, +Inf last."""
    return tuple(child._upper_bounds)


def add_to_histogram(child: Histogram, counts: Sequence[int], total: float) -> None:
    """Adds `counts` (one per bound of `histogram_bounds`) and `total` to the child's values, as
    that many `observe()` calls would: in the multiprocess files, a lock and an mmap store each."""
    child._sum.inc(total)
    for bucket, n in zip(child._buckets, counts, strict=True):
        if n:
            bucket.inc(n)


class WorkerFilesCollector:
    """The workers' files merged as `MultiProcessCollector` merges them, without the file a worker
    is creating at that moment: it exists empty until the worker sizes it, and prometheus-client
    reads its first bytes unchecked (a `struct.error`, so the scrape failed with a 500)."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._directory, "*.db")):
            try:
                if os.path.getsize(path) >= _USED_FIELD:
                    files.append(path)
            except FileNotFoundError:  # a dead worker's live gauge, removed since the glob
                continue
        return MultiProcessCollector.merge(files, accumulate=True)
