"""prometheus_client's internals, used here and nowhere else: a histogram child's bounds, and
adding a batch of observations to its sum and bucket counters.

Owns: `histogram_bounds` and `add_to_histogram`, which `observe.metrics.LocalHistogram` uses to
accumulate a child's observations in the worker and write them in one batch (docs/performance.md).
Must never: add a count to another bucket than `Histogram.observe` would, or import anything of
ours outside `compat`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sigv4proxy.compat.versions import PROMETHEUS_CLIENT as SUPPORTED

SUPPORTED.check()  # before prometheus_client loads: the code below was written and tested for this range only

from prometheus_client import Histogram  # noqa: E402


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
