"""prometheus_client's internals, used here and nowhere else: a histogram child's bounds, sum and
bucket counters, written in one batch.

Owns: `LocalHistogram`, one labelled histogram child accumulated in this worker and added to the
child's own values (in the shared multiprocess files) by `flush()`. Each write there takes a lock
and an mmap store and a request records six of them: several times the cost of one process
(docs/performance.md). Scrapes see a worker's observations at its next flush. Must never: count an
observation in another bucket than `Histogram.observe` would, lose one between flushes, or import
anything of ours outside `compat`.
"""

from __future__ import annotations

from bisect import bisect_left

from sigv4proxy.compat.versions import PROMETHEUS_CLIENT as SUPPORTED

SUPPORTED.check()  # before prometheus_client loads: the code below was written and tested for this range only

from prometheus_client import Histogram  # noqa: E402


class LocalHistogram:
    """Observations of one histogram child, kept here until `flush()` (see the module)."""

    __slots__ = ("_child", "_bounds", "_counts", "_sum", "_pending")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds = tuple(child._upper_bounds)  # +Inf last
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = False

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1  # first bound >= amount, as observe()
        self._sum += amount
        self._pending = True

    def flush(self) -> None:
        if not self._pending:
            return
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        self._pending = False
        child = self._child
        child._sum.inc(total)
        for bucket, n in zip(child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
