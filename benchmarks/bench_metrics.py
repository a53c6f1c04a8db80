"""Cost of recording one request's metrics (target: <= 5 us median), in one process and with
workers (prometheus-client's multiprocess files, where histograms are batched per worker and
flushed every 0.5 s: the flush is timed too, once per batch, and spread over its requests),
beside a bare histogram observe for scale. Run by `make bench-sign`; prints medians of repeated
timed batches. The multiprocess figure runs in a child process: prometheus-client picks its value
store when it is first imported."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 20_000
REPEATS = 9


def median_us(fn, after_batch=None) -> float:
    fn()  # warm-up: labelled children get created and cached
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(BATCH):
            fn()
        if after_batch is not None:
            after_batch()
        samples.append((time.perf_counter_ns() - start) / BATCH / 1000)
    return statistics.median(samples)


def measure() -> tuple[float, float]:
    from prometheus_client import CollectorRegistry, Histogram

    from sigv4proxy.observe.metrics import Metrics

    metrics = Metrics()

    def record() -> None:
        # What the handler records per proxied request: the three stage timings.
        metrics.observe_request("GET", 200, "default", 0.0012, 0.000005, 0.0008, "HTTP/2")

    bare = Histogram("bare_seconds", "scale", registry=CollectorRegistry())
    return median_us(record, metrics.flush), median_us(lambda: bare.observe(0.0012))


def main() -> None:
    if "--child" in sys.argv:
        ours, single = measure()
        print(f"{ours} {single}")
        return
    ours, single = measure()
    with tempfile.TemporaryDirectory() as multiproc:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=multiproc)
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True,
                             text=True, timeout=300, check=True).stdout.split()
    workers, workers_single = float(out[0]), float(out[1])
    for label, value, bare in (("metrics per request, one process", ours, single),
                               ("metrics per request, with workers", workers, workers_single)):
        verdict = "met" if value <= 5 else "NOT met"
        print(f"{label:<36}{value:8.2f} us median  (target <= 5 us: {verdict}); "
              f"one bare Histogram.observe {bare:.2f} us")


if __name__ == "__main__":
    main()
