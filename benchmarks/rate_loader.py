"""A constant-rate HTTP/1.1 load generator for `make bench` (wrk2's method; Debian has no wrk2).

Owns: sending requests on a fixed schedule (the k-th at start + k/rate) over a fixed set of
keep-alive connections, and timing each from when it was due, not from when it went out, so a
server that stalls is charged for every request that had to wait (no coordinated omission).
It prints one JSON line: requests answered, the rate achieved, p50/p99 in µs, non-2xx and socket
errors. It must never connect anywhere but 127.0.0.1 and never run unbounded: it stops issuing
at `--duration` and waits at most `--drain` seconds for answers still out (each counts as an
error).

    python benchmarks/rate_loader.py --port 8080 --rate 4000 --duration 5 [--connections 64]
        [--host-header H] [--path /hello] [--method POST --body-file F]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path

from bench_parse import percentile

LOOPBACK = "127.0.0.1"
# How often the schedule is looked at (libuv's timers have millisecond resolution): requests due
# meanwhile go out together, so up to a tick of each latency is the schedule's granularity.
TICK_S = 0.001


def due_count(elapsed_s: float, rate: float, total: int) -> int:
    """Requests due by `elapsed_s` after the start: the k-th (from 0) is due at k / rate."""
    if elapsed_s < 0:
        return 0
    return min(total, int(elapsed_s * rate) + 1)


def request_bytes(method: str, path: str, host: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body or method not in ("GET", "HEAD"):
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + body


class ResponseReader:
    """Finds the end of each HTTP/1.1 response in a byte stream (Content-Length or chunked).

    feed() returns the statuses of the responses completed by `data`; it raises ValueError on
    bytes that are not a response."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.status = 0
        self.body_left = -1  # -1: reading a head; >= 0: Content-Length bytes still to come
        self.chunked = False
        self.close = False  # the server said Connection: close

    def feed(self, data: bytes) -> list[int]:
        self.buffer += data
        done = []
        while True:
            if self.body_left < 0 and not self.chunked:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return done
                self._head(bytes(self.buffer[:end]))
                del self.buffer[:end + 4]
            if self.chunked:
                if not self._chunks():
                    return done
            elif len(self.buffer) >= self.body_left:
                del self.buffer[:self.body_left]
            else:
                return done
            if 100 <= self.status < 200:  # an interim answer: the real one follows
                self.body_left, self.chunked = -1, False
                continue
            done.append(self.status)
            self.body_left, self.chunked = -1, False

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:60]!r}")
        self.status = int(parts[1])
        self.body_left, self.chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                self.body_left = int(value)
            elif name == b"transfer-encoding" and value.endswith(b"chunked"):
                self.chunked = True
            elif name == b"connection" and value == b"close":
                self.close = True
        if 100 <= self.status < 200 or self.status in (204, 304):
            self.body_left, self.chunked = 0, False

    def _chunks(self) -> bool:
        """Consumes whole chunks; True once the last chunk and its trailers are in."""
        while True:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
            if size == 0:
                trailers_end = self.buffer.find(b"\r\n\r\n", end)
                if self.buffer[end:end + 4] == b"\r\n\r\n":
                    del self.buffer[:end + 4]
                    return True
                if trailers_end < 0:
                    return False
                del self.buffer[:trailers_end + 4]
                return True
            if len(self.buffer) < end + 2 + size + 2:
                return False
            del self.buffer[:end + 2 + size + 2]


class Connection(asyncio.Protocol):
    def __init__(self, loader: "RateLoader") -> None:
        self.loader = loader
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader()
        self.due_at: float | None = None  # the in-flight request's scheduled time

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loader.idle.append(self)
        self.loader.dispatch()

    def send(self, due_at: float) -> None:
        self.due_at = due_at
        self.transport.write(self.loader.request)

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self.reader.feed(data)
        except ValueError:
            self.transport.close()
            return
        for status in statuses:
            self.loader.answered(self.due_at, status)
            self.due_at = None
        if statuses:
            if self.reader.close:
                self.transport.close()
                return
            self.loader.idle.append(self)
            self.loader.dispatch()

    def connection_lost(self, exc) -> None:
        self.loader.lost(self)


class RateLoader:
    def __init__(self, port: int, rate: float, duration_s: float, connections: int,
                 request: bytes, drain_s: float) -> None:
        self.port, self.rate, self.connections = port, rate, connections
        self.total = max(1, round(rate * duration_s))
        self.request, self.drain_s = request, drain_s
        self.backlog: collections.deque[float] = collections.deque()  # due times not yet sent
        self.idle: collections.deque[Connection] = collections.deque()
        self.latencies_us: list[float] = []
        self.non_2xx = 0
        self.socket_errors = 0
        self.issued = 0
        self.outstanding = 0
        self.last_answer = 0.0
        self.closing = False
        self.drained: asyncio.Event | None = None

    def dispatch(self) -> None:
        while self.backlog and self.idle:
            conn = self.idle.popleft()
            if conn.transport is None or conn.transport.is_closing():
                continue
            conn.send(self.backlog.popleft())

    def answered(self, due_at: float | None, status: int) -> None:
        if due_at is None:
            self.socket_errors += 1  # an answer nobody asked for
            return
        self.last_answer = time.monotonic()
        self.latencies_us.append((self.last_answer - due_at) * 1e6)
        if not 200 <= status < 300:
            self.non_2xx += 1
        self._one_done()

    def _one_done(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and self.issued == self.total and self.drained is not None:
            self.drained.set()

    def lost(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.due_at is not None:  # the request in flight is gone: an error, and it is done
            self.socket_errors += 1
            conn.due_at = None
            self._one_done()
        if not self.closing:
            asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Connection(self), LOOPBACK, self.port)
        except OSError:
            self.socket_errors += 1

    async def run(self) -> dict:
        self.drained = asyncio.Event()
        await asyncio.gather(*(self.connect() for _ in range(self.connections)))
        if not self.idle:
            raise OSError(f"could not connect to {LOOPBACK}:{self.port}")
        start = time.monotonic()
        while self.issued < self.total:
            due = due_count(time.monotonic() - start, self.rate, self.total)
            for k in range(self.issued, due):
                self.backlog.append(start + k / self.rate)
            self.outstanding += due - self.issued
            self.issued = due
            self.dispatch()
            await asyncio.sleep(TICK_S)
        try:
            await asyncio.wait_for(self.drained.wait(), self.drain_s)
        except asyncio.TimeoutError:
            self.socket_errors += self.outstanding  # never answered within the drain time
        self.closing = True
        for conn in list(self.idle):
            conn.transport.close()
        self.latencies_us.sort()
        answered = len(self.latencies_us)
        elapsed = max(self.last_answer - start, 1e-6)  # to the last answer: a lag shows as a lower rate
        return {
            "offered_rps": self.rate,
            "requests": answered,
            "duration_s": round(elapsed, 3),
            "rps": round(answered / elapsed, 1),
            "p50_us": percentile(self.latencies_us, 50) if answered else 0.0,
            "p99_us": percentile(self.latencies_us, 99) if answered else 0.0,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="on 127.0.0.1")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of issuing")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--drain", type=float, default=5.0,
                        help="seconds to wait for answers after the last request went out")
    parser.add_argument("--host-header", default=LOOPBACK)
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-file", type=Path)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.connections < 1:
        parser.error("--rate, --duration and --connections must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    body = args.body_file.read_bytes() if args.body_file else b""
    loader = RateLoader(args.port, args.rate, args.duration, args.connections,
                        request_bytes(args.method, args.path, args.host_header, body), args.drain)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        result = run(loader.run())
    except OSError as exc:
        print(f"rate_loader: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
