"""The upstream vocabulary as plain data: where to connect (`Origin`), how long to wait
(`Timeouts`) and how many connections (`PoolLimits`). Routing builds them from the config; the
upstream layer uses them. Must never: import anything of ours, or do I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str  # "http" | "https"
    host: str  # where to connect (name or IP literal)
    port: int
    # "auto": https -> ALPN ["h2", "http/1.1"], http -> HTTP/1.1;
    # "h2": https -> ALPN h2 only, http -> h2c with prior knowledge; "http1": HTTP/1.1 always.
    protocol: str = "auto"
    server_hostname: str | None = None  # SNI + certificate name; default: host

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {self.scheme!r}")
        if self.protocol not in ("auto", "h2", "http1"):
            raise ValueError(f"unsupported protocol {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    @property
    def alpn(self) -> tuple[str, ...]:
        """The ALPN offer for this origin (TLS only)."""
        if self.protocol == "h2":
            return ("h2",)
        if self.protocol == "http1":
            return ("http/1.1",)
        return ("h2", "http/1.1")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0  # TCP+TLS+preface
    first_byte: float = 30.0  # request sent -> response headers
    read: float = 60.0  # max gap between response body chunks (and between send-window openings)
    idle: float = 50.0  # pooled connection with no streams is closed after this (Lattice: 60 s)
    # A connection this old takes nothing new and closes once its work is done (Lattice cuts every
    # connection at 10 minutes); each retires at a random 90-100 % of it (0: no limit)
    max_age: float = 0.0
    pool: float = 30.0  # max wait for a free connection/stream slot -> Overloaded (503)
    ping: float = 30.0  # HTTP/2: PING an idle pooled connection this often; no ACK in `connect` s closes it (0: off)
    # Expect: 100-continue: how long a held upload waits for the upstream's 100 or final answer
    # before it is sent anyway (curl waits 1 s for the same; RFC 9110 §10.1.1 bounds the wait)
    expect_continue: float = 1.0


@dataclass(frozen=True, slots=True)
class PoolLimits:
    # HTTP/2: open another only when all are at their peer's MAX_CONCURRENT_STREAMS;
    # HTTP/1.1: max concurrent sockets, so also max concurrent requests (beyond it they queue).
    max_connections_per_origin: int = 128
    max_retries: int = 2  # for RetryableStreamError
