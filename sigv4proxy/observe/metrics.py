"""Prometheus metrics: definitions, cheap per-request recording, and exposition.

Owns: metric names (stable; documented in the README), bounded labels, per-request latency
histograms accumulated in the process (`LocalHistogram`) and written in batches, and multiprocess
aggregation (prometheus-client's multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is set, which
the worker supervisor does before any worker imports this). Must never: use a raw path, host or
header value as a label, hold a secret, or answer a scrape with observations left unwritten.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sigv4proxy.compat.prometheus_client import WorkerFilesCollector, add_to_histogram, histogram_bounds

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIGNING_BUCKETS = (2e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CODE_CLASSES = {0: "aborted", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class LocalHistogram:
    """One histogram child's observations, kept in this process until `flush()` adds them to the
    child. `Histogram.observe` takes a lock and updates two values (with workers: two locked
    mmap stores); this is a bisect and two stores, and a scrape flushes first."""

    __slots__ = ("_child", "_bounds", "_counts", "_sum", "_pending")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds = histogram_bounds(child)
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
        add_to_histogram(self._child, counts, total)


class Metrics:
    """All of the proxy's metrics, in a registry of their own (tests run several proxies)."""

    def __init__(self, registry: CollectorRegistry | None = None, batch: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "sigv4proxy_request_duration_seconds",
            "Whole request through the proxy",
            ["method", "code_class", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.signing_duration = Histogram(
            "sigv4proxy_signing_duration_seconds", "Time to sign one request", buckets=SIGNING_BUCKETS, registry=r
        )
        self.upstream_duration = Histogram(
            "sigv4proxy_upstream_duration_seconds",
            "Request sent to upstream response headers",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "sigv4proxy_requests_inflight", "Requests being proxied now", multiprocess_mode="livesum", registry=r
        )
        self.errors = Counter("sigv4proxy_errors", "Failed requests by kind", ["kind"], registry=r)
        self.credentials_expiry = Gauge(
            "sigv4proxy_credentials_expiry_timestamp_seconds",
            "Expiry of the current credentials (0: none or no expiry)",
            multiprocess_mode="min",
            registry=r,
        )
        self.upstream_retries = Counter(
            "sigv4proxy_upstream_retries", "Upstream requests sent again on another connection", ["reason"], registry=r
        )
        self.credential_refresh = Counter(
            "sigv4proxy_credential_refresh", "Credential refresh attempts", ["result"], registry=r
        )
        self.upstream_connections = Gauge(
            "sigv4proxy_upstream_connections",
            "Pooled upstream connections",
            ["protocol", "state"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.upstream_streams = Gauge(
            "sigv4proxy_upstream_streams_active",
            "Upstream requests/streams in progress",
            multiprocess_mode="livesum",
            registry=r,
        )
        # Labelled children cached: `.labels()` takes a lock and builds a tuple on every call.
        self._request_children: dict[tuple[str, int, str], Histogram | LocalHistogram] = {}
        self._upstream_children: dict[str, Histogram | LocalHistogram] = {}
        self._error_children: dict[str, Counter] = {}
        # Histograms accumulate in the process until flush() (exposition() flushes first; with
        # workers, another worker's figures are at most app.METRICS_INTERVAL late). batch=False
        # observes each request directly: the tests' oracle.
        self._local: list[LocalHistogram] | None = [] if batch else None
        self._sign_observe = self._histogram(self.signing_duration).observe

    def _histogram(self, child: Histogram) -> Histogram | LocalHistogram:
        if self._local is None:
            return child
        local = LocalHistogram(child)
        self._local.append(local)
        return local

    def flush(self) -> None:
        """Writes what this worker observed since the last flush to the shared files."""
        for local in self._local or ():
            local.flush()

    def observe_request(
        self,
        method: str,
        status: int,
        route: str,
        total: float,
        signing: float | None = None,
        upstream: float | None = None,
        protocol: str | None = None,
    ) -> None:
        key = (method, status // 100, route)
        child = self._request_children.get(key)
        if child is None:
            label = method if method in METHODS else "OTHER"
            child = self._request_children[key] = self._histogram(
                self.request_duration.labels(label, CODE_CLASSES.get(status // 100, "other"), route)
            )
        child.observe(total)
        if signing is not None:
            self._sign_observe(signing)
        if upstream is not None and protocol is not None:
            up = self._upstream_children.get(protocol)
            if up is None:
                up = self._upstream_children[protocol] = self._histogram(self.upstream_duration.labels(protocol))
            up.observe(upstream)

    def errors_for(self, kind: str) -> Counter:
        child = self._error_children.get(kind)
        if child is None:
            child = self._error_children[kind] = self.errors.labels(kind)
        return child

    def on_upstream_retry(self, reason: str) -> None:
        self.upstream_retries.labels(reason).inc()

    def on_credential_refresh(self, result: str) -> None:
        self.credential_refresh.labels(result).inc()

    def update_gauges(self, credentials_expiry: float | None, pool_stats: object | None, inflight: int = 0) -> None:
        """Owners' state copied into gauges; called periodically and before each scrape.
        (In-flight is copied too rather than inc/dec per request: a gauge update per request is not free.)"""
        self.credentials_expiry.set(credentials_expiry or 0)
        self.inflight.set(inflight)
        if pool_stats is None:
            return
        connections = getattr(pool_stats, "connections", {}) or {}
        for protocol in ("h2", "http1"):
            for state in ("active", "idle"):
                self.upstream_connections.labels(protocol, state).set(connections.get((protocol, state), 0))
        self.upstream_streams.set(getattr(pool_stats, "streams_active", 0))

    def exposition(self) -> bytes:
        self.flush()  # this worker's own figures are never stale in its own answer
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            registry.register(WorkerFilesCollector(directory))
            return generate_latest(registry)
        return generate_latest(self.registry)


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (the supervisor calls this)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
