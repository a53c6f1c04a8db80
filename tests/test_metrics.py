"""Metrics recording: with workers, histograms are accumulated per worker and written to the shared
files in batches; what a scrape then sees must equal what prometheus-client's own per-request
observe() would have recorded (a second Metrics fed the same values is the oracle)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from prometheus_client import CollectorRegistry

from sigv4proxy.observe.metrics import LATENCY_BUCKETS, SIGNING_BUCKETS, Metrics


def _samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry.collect() for s in family.samples
            if s.name.startswith(("sigv4proxy_request_duration", "sigv4proxy_signing_duration",
                                  "sigv4proxy_upstream_duration")) and not s.name.endswith("_created")}


def _feed(metrics: Metrics, rng: random.Random, n: int) -> None:
    edges = list(LATENCY_BUCKETS) + list(SIGNING_BUCKETS)
    for _ in range(n):
        # values on bucket edges too: `le` is inclusive, the batch must place them alike
        total = rng.choice(edges) if rng.random() < 0.3 else rng.uniform(0, 40)
        signing = rng.choice(SIGNING_BUCKETS) if rng.random() < 0.3 else rng.uniform(0, 0.002)
        metrics.observe_request(rng.choice(["GET", "POST", "BREW"]), rng.choice([200, 404, 502, 0]),
                                rng.choice(["default", "orders"]), total, signing,
                                rng.uniform(0, 1), rng.choice(["HTTP/2", "HTTP/1.1"]))


def test_batched_histograms_equal_direct_observes_after_each_flush():
    batched = Metrics(CollectorRegistry(), batch=True)
    direct = Metrics(CollectorRegistry(), batch=False)
    for round_ in range(3):
        seed = 1000 + round_
        _feed(batched, random.Random(seed), 500)
        _feed(direct, random.Random(seed), 500)
        if round_ == 0:  # nothing is written before the first flush
            assert all(v == 0 for v in _samples(batched).values())
        batched.flush()
        got, want = _samples(batched), _samples(direct)
        assert set(got) == set(want)
        for key, value in want.items():
            assert abs(got[key] - value) < 1e-6 * max(1.0, abs(value)), key


def test_exposition_flushes_first():
    metrics = Metrics(CollectorRegistry(), batch=True)
    metrics.observe_request("GET", 200, "default", 0.003, 0.000004, 0.002, "HTTP/2")
    text = metrics.exposition().decode()
    assert 'sigv4proxy_request_duration_seconds_count{code_class="2xx",method="GET",route="default"} 1.0' in text


_SCRAPE_WITH_A_WORKER_STARTING = r"""
import os, pathlib, struct, sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sigv4proxy.observe.metrics import Metrics

metrics = Metrics()
metrics.observe_request("GET", 200, "default", 0.003, 0.000004, 0.002, "HTTP/1.1")
metrics.flush()
# A worker starting this moment: prometheus-client has created its file and not yet sized it.
(pathlib.Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / "histogram_4194303.db").touch()
try:
    reference = CollectorRegistry()
    MultiProcessCollector(reference)
    generate_latest(reference)
    print("the library's own collector read it")
except struct.error:
    print("the library's own collector failed")
sys.stdout.write(metrics.exposition().decode())
"""


def test_a_scrape_while_a_worker_creates_its_file_still_answers(tmp_path):
    """With workers, a scrape reads every worker's file; one that a starting worker has created
    but not yet sized made prometheus-client's own collector raise, and /metrics answer 500."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))  # read when prometheus_client loads
    out = subprocess.run([sys.executable, "-c", _SCRAPE_WITH_A_WORKER_STARTING], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    first, _, exposition = out.stdout.partition("\n")
    assert first == "the library's own collector failed"  # the state the test means to build
    assert 'sigv4proxy_request_duration_seconds_count{code_class="2xx",method="GET",route="default"} 1.0' in exposition
    assert 'sigv4proxy_upstream_duration_seconds_count{protocol="HTTP/1.1"} 1.0' in exposition
