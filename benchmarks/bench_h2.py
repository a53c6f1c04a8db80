"""CPU per request through `ConnectionPool` over h2c: `H2Connection` (h2) vs `LeanH2Connection`.

One process on uvloop: a canned h2c server on 127.0.0.1 (raw frames, precomputed answers, so its
own cost is small and the same for both) and the pool as the client. Scenarios: GET with no body
and POST with a 1 KiB bytes body, each sequential (one request at a time) and concurrent (64 in
flight). The request carries a realistic signed Lattice header set (~1 KB session token). The
response is HPACK-encoded by `hpack.Encoder` as a real server would (Huffman, dynamic table: the
first answer on a connection inserts, later ones are indexed). Rounds of both implementations are
interleaved so machine noise hits them alike; the median CPU µs per request over rounds is
printed side by side with the ratio. `--profile lean|h2` prints the top cProfile frames of the
sequential GET loop instead. Bounded: fixed rounds and request counts (about 10-20 s in total).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import statistics
import time

import hpack
import uvloop

from sigv4proxy.wire import h2_wire as w
from sigv4proxy.model import Origin
from sigv4proxy.upstream.http2 import H2Connection
from sigv4proxy.upstream.lean_h2 import LeanH2Connection
from sigv4proxy.upstream.pool import ConnectionPool

ROUNDS = 9
SEQUENTIAL = 400  # requests per sequential round
CONCURRENT = 64  # in flight at once in a concurrent round
CONCURRENT_TOTAL = 1280  # requests per concurrent round
WARMUP = 300

AUTHORITY = b"svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
TOKEN = (b"IQoJb3JpZ2luX2VjEXAMPLE" * 44)[:1000]
REQUEST_HEADERS = [
    (b"user-agent", b"my-app/1.4 python-requests/2.31"), (b"accept", b"*/*"),
    (b"content-type", b"application/json"), (b"x-forwarded-for", b"10.0.3.17"),
    (b"x-amz-date", b"20261123T104149Z"), (b"x-amz-content-sha256", b"UNSIGNED-PAYLOAD"),
    (b"x-amz-security-token", TOKEN),
    (b"authorization", b"AWS4-HMAC-SHA256 Credential=ASIAEXAMPLEEXAMPLE/20261123/us-west-2/"
                       b"vpc-lattice-svcs/aws4_request, SignedHeaders=accept;content-type;host;"
                       b"user-agent;x-amz-content-sha256;x-amz-date;x-amz-security-token;"
                       b"x-forwarded-for, Signature=" + b"0" * 64),
]
RESPONSE_BODY = b'{"items":[{"id":1,"name":"alpha"},{"id":2,"name":"beta"}],"next":null}' * 3
RESPONSE_HEADERS = [
    (b":status", b"200"), (b"content-type", b"application/json"),
    (b"content-length", str(len(RESPONSE_BODY)).encode()),
    (b"date", b"Mon, 23 Nov 2026 10:41:49 GMT"), (b"server", b"envoy"),
    (b"x-envoy-upstream-service-time", b"3"),
]
POST_BODY = bytes(range(256)) * 4


class CannedH2Server(asyncio.Protocol):
    """Just enough HTTP/2 server: answers each request with the same response, grants credit."""

    def __init__(self) -> None:
        encoder = hpack.Encoder()
        self.first_block = encoder.encode(RESPONSE_HEADERS)  # inserts into the table
        self.next_block = encoder.encode(RESPONSE_HEADERS)  # indexed from then on
        self.first = True
        self.buffer = b""
        self.preface_seen = False
        self.transport: asyncio.Transport | None = None
        self.continuing: dict[int, bool] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        hello = (w.settings_frame([(w.SETTINGS_MAX_CONCURRENT_STREAMS, 256)])
                 + w.window_update_frame(0, 1 << 30))
        transport.write(hello)  # type: ignore[attr-defined]

    def respond(self, out: list[bytes], stream_id: int) -> None:
        block = self.first_block if self.first else self.next_block
        self.first = False
        out.append(w.frame(w.HEADERS, w.FLAG_END_HEADERS, stream_id, block))
        out.append(w.frame(w.DATA, w.FLAG_END_STREAM, stream_id, RESPONSE_BODY))

    def data_received(self, data: bytes) -> None:
        data = self.buffer + data
        pos = 0
        if not self.preface_seen:
            if len(data) < len(w.PREFACE):
                self.buffer = data
                return
            pos = len(w.PREFACE)
            self.preface_seen = True
        out: list[bytes] = []
        while len(data) - pos >= 9:
            high, low, ftype, flags, sid = w.FRAME_HEADER.unpack_from(data, pos)
            stop = pos + 9 + ((high << 16) | low)
            if stop > len(data):
                break
            length = stop - pos - 9
            pos = stop
            if ftype == w.SETTINGS and not flags & w.FLAG_ACK:
                out.append(w.SETTINGS_ACK)
            elif ftype == w.HEADERS:
                ends = bool(flags & w.FLAG_END_STREAM)
                if not flags & w.FLAG_END_HEADERS:
                    self.continuing[sid] = ends
                elif ends:
                    self.respond(out, sid)
            elif ftype == w.CONTINUATION and flags & w.FLAG_END_HEADERS:
                if self.continuing.pop(sid, False):
                    self.respond(out, sid)
            elif ftype == w.DATA:
                if length:
                    out.append(w.window_update_frame(0, length))
                    if not flags & w.FLAG_END_STREAM:
                        out.append(w.window_update_frame(sid, length))
                if flags & w.FLAG_END_STREAM:
                    self.respond(out, sid)
            elif ftype == w.PING and not flags & w.FLAG_ACK:
                out.append(w.ping_ack_frame(data[stop - 8:stop]))
        self.buffer = data[pos:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def one(pool: ConnectionPool, origin: Origin, method: bytes, body: bytes | None) -> None:
    response = await pool.request(origin, method, b"/api/v1/items?a=1&b=two", AUTHORITY,
                                  REQUEST_HEADERS, body)
    data = await response.read()
    if response.status != 200 or len(data) != len(RESPONSE_BODY):
        raise RuntimeError("benchmark response was wrong")


async def sequential(pool: ConnectionPool, origin: Origin, method: bytes, body: bytes | None,
                     count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        await one(pool, origin, method, body)
    return (time.process_time() - start) / count * 1e6


async def concurrent(pool: ConnectionPool, origin: Origin, method: bytes, body: bytes | None,
                     count: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await one(pool, origin, method, body)

    start = time.process_time()
    await asyncio.gather(*(worker(count // CONCURRENT) for _ in range(CONCURRENT)))
    return (time.process_time() - start) / (count // CONCURRENT * CONCURRENT) * 1e6


SCENARIOS = [
    ("GET sequential", sequential, b"GET", None, SEQUENTIAL),
    ("POST 1 KiB sequential", sequential, b"POST", POST_BODY, SEQUENTIAL),
    (f"GET {CONCURRENT} concurrent", concurrent, b"GET", None, CONCURRENT_TOTAL),
    (f"POST 1 KiB {CONCURRENT} concurrent", concurrent, b"POST", POST_BODY, CONCURRENT_TOTAL),
]
IMPLEMENTATIONS = {"h2": H2Connection, "lean": LeanH2Connection}


async def main(profile: str | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CannedH2Server, "127.0.0.1", 0)
    origin = Origin("http", "127.0.0.1", server.sockets[0].getsockname()[1], protocol="h2")
    pools = {name: ConnectionPool(h2_connection_factory=cls)
             for name, cls in IMPLEMENTATIONS.items()}
    try:
        for pool in pools.values():
            await sequential(pool, origin, b"GET", None, WARMUP)
            await concurrent(pool, origin, b"POST", POST_BODY, CONCURRENT * 4)
        if profile:
            await run_profile(pools[profile], origin)
            return
        results: dict[tuple[str, str], list[float]] = {}
        gc.collect()
        for _ in range(ROUNDS):
            for label, run, method, body, count in SCENARIOS:
                for name, pool in pools.items():
                    results.setdefault((label, name), []).append(
                        await run(pool, origin, method, body, count))
        print(f"CPU µs per request (median of {ROUNDS} rounds; "
              "one process: client + canned server)")
        print(f"{'scenario':<28} {'h2':>8} {'lean':>8} {'h2/lean':>8}")
        for label, *_ in SCENARIOS:
            h2_us = statistics.median(results[(label, "h2")])
            lean_us = statistics.median(results[(label, "lean")])
            print(f"{label:<28} {h2_us:8.1f} {lean_us:8.1f} {h2_us / lean_us:8.2f}")
    finally:
        for pool in pools.values():
            await pool.aclose()
        server.close()
        await server.wait_closed()


async def run_profile(pool: ConnectionPool, origin: Origin) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    await sequential(pool, origin, b"GET", None, 3000)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(IMPLEMENTATIONS), default=None)
    args = parser.parse_args()
    uvloop.run(main(args.profile))
