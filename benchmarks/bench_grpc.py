"""gRPC for `make bench`: the upstream gRPC server and a bounded grpcio unary loop.

Owns: `serve`, the tests' echo service (tests/grpc_support/echo_service.py, a real grpcio server)
on a free loopback port, and `loop`, a grpcio client making unary calls on one channel (one HTTP/2
connection, as an app holds it) with `--concurrency` calls in flight, each reply checked, until
`--seconds` or `--max-calls`. `loop` prints one JSON line: calls answered, the rate, p50/p99 in
µs, calls that failed or came back wrong. It must never connect or bind anywhere but 127.0.0.1
and never run unbounded.

    python benchmarks/bench_grpc.py serve          # prints `listening PORT`
    python benchmarks/bench_grpc.py loop --port 8080 --authority HOST --seconds 5 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from bench_parse import percentile

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
METHOD = "/test.Echo/Unary"
PAYLOAD = bytes(range(64))
EXPECTED = b"echo:" + PAYLOAD


def channel_options(authority: str) -> list[tuple[str, object]]:
    # The proxy routes on :authority; no proxy from the environment, no retries to hide failures.
    return [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0),
            ("grpc.enable_retries", 0)]


async def serve() -> None:
    """Runs until SIGTERM; prints `listening PORT` once it serves (it binds a free port)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from grpc_support.echo_service import EchoService

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with EchoService() as service:
        print(f"listening {service.port}", flush=True)
        while not stop.is_set():
            service.metadata.clear()  # kept per call for the tests; a bench makes millions
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


def listening_port(log_text: str) -> int | None:
    """The port `serve` printed, or None before it did."""
    for line in log_text.splitlines():
        if line.startswith("listening "):
            return int(line.split()[1])
    return None


async def unary_loop(port: int, authority: str, seconds: float, max_calls: int,
                     concurrency: int, timeout_s: float) -> dict:
    import grpc

    latencies: list[float] = []
    failed = wrong = 0
    started = time.monotonic()
    deadline = started + seconds
    issued = 0
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}",
                                         options=channel_options(authority)) as channel:
        call = channel.unary_unary(METHOD)

        async def worker() -> None:
            nonlocal failed, wrong, issued
            while issued < max_calls and time.monotonic() < deadline:
                issued += 1
                t0 = time.monotonic()
                try:
                    reply = await call(PAYLOAD, timeout=timeout_s)
                except grpc.aio.AioRpcError:
                    failed += 1
                    continue
                latencies.append((time.monotonic() - t0) * 1e6)
                wrong += reply != EXPECTED

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies) + failed, "duration_s": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_us": percentile(latencies, 50) if latencies else 0.0,
            "p99_us": percentile(latencies, 99) if latencies else 0.0,
            "non_2xx": wrong, "socket_errors": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="the echo service on a free loopback port until SIGTERM")
    loop_cmd = sub.add_parser("loop", help="unary calls through 127.0.0.1:PORT, then one JSON line")
    loop_cmd.add_argument("--port", type=int, required=True)
    loop_cmd.add_argument("--authority", default=LOOPBACK)
    loop_cmd.add_argument("--seconds", type=float, default=5.0)
    loop_cmd.add_argument("--max-calls", type=int, default=1_000_000)
    loop_cmd.add_argument("--concurrency", type=int, default=16)
    loop_cmd.add_argument("--timeout", type=float, default=5.0, help="per call, seconds")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(serve())
        return 0
    if args.seconds <= 0 or args.max_calls < 1 or args.concurrency < 1:
        parser.error("--seconds, --max-calls and --concurrency must be positive")
    result = asyncio.run(unary_loop(args.port, args.authority, args.seconds, args.max_calls,
                                    args.concurrency, args.timeout))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
