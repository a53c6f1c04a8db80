"""The proxy in front of a simulator with Lattice's connection limits shortened (idle close 0.2 s,
maximum connection age 1 s), over HTTP/1.1 and HTTP/2 upstreams: requests spread over several
idle and age periods, pauses landing before, on and after the idle timer, and none may fail.

Two settings of the proxy:
- its own retirement later than the simulator's limits (as the proxy's idle timeout of 90 s was
  against Lattice's 60 s): every close comes from the simulator, and what makes idempotent
  requests survive a closed or closing pooled connection is the retry of requests never answered;
- its own retirement first (idle timeout and `max_connection_age` under the simulator's, as the
  defaults are meant to be under Lattice's): then no request of any method meets a closed
  connection, so POSTs must all pass too.

The simulator runs as its own process, as Lattice is another host: a close at its idle limit
races a request written at the same moment only when the two do not share one event loop. Each
request is verified there (the echo names the principal it authenticated). Its counts of closes by
reason, read when it stops, show that the limits were met; a failure message lists what failed
beside them.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from support.proxy import LATTICE_HOST, PRINCIPAL, SERVICE_ARN, running_proxy, write_identities
from support.sim_process import sim_process

IDLE = 0.2  # the simulator's idle close
AGE = 1.0  # the simulator's maximum connection age
# Pauses between sequential requests, as multiples of IDLE: most land on the idle timer (the
# request reaches the simulator a few milliseconds after the pause), some clearly before it (the
# connection is reused) or after it (the pooled connection was closed while idle).
PAUSES = (0.5, 0.98, 0.99, 1.0, 1.01, 1.02, 1.5, 0.99, 1.0, 1.01, 1.02, 1.03, 2.0, 1.0, 1.01, 1.02, 1.03, 1.04,
          1.0, 0.5)
WORKERS = 4  # concurrent clients keeping connections busy across the maximum age
AGE_PHASE = 3 * AGE
UPSTREAMS = [pytest.param("h2", "lean", id="h2-lean"), pytest.param("h2", "h2", id="h2-library"),
             pytest.param("http1", "lean", id="http1")]
IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")


@pytest.fixture
def limited_sim(tmp_path):
    with sim_process(tmp_path, "--listen", "127.0.0.1:0", "--identities", str(write_identities(tmp_path)),
                     "--service-arn", SERVICE_ARN, "--idle-timeout", str(IDLE),
                     "--max-connection-age", str(AGE)) as sim:
        yield sim


class Outcomes:
    def __init__(self) -> None:
        self.ok = 0
        self.failed: list[str] = []

    def report(self, closes: dict) -> str:
        return (f"{len(self.failed)} of {self.ok + len(self.failed)} requests failed: {self.failed[:20]}; "
                f"simulator closes {closes}")


async def one(session: aiohttp.ClientSession, base: str, method: str, path: str, outcomes: Outcomes) -> None:
    body = f"body of {path}".encode() if method in ("PUT", "POST") else None
    try:
        async with session.request(method, base + path, data=body, headers={"Host": LATTICE_HOST},
                                   timeout=aiohttp.ClientTimeout(total=15)) as resp:
            payload = await resp.read()
            if resp.status != 200:
                kind = resp.headers.get("x-sigv4proxy-error", "-")
                outcomes.failed.append(f"{method} {path}: {resp.status} {kind} {payload[:80]!r}")
                return
            if method != "HEAD":
                echo = json.loads(payload)
                if echo["principal"] != PRINCIPAL or echo["method"] != method or \
                        echo["body_length"] != len(body or b""):
                    outcomes.failed.append(f"{method} {path}: echo does not match: {payload[:120]!r}")
                    return
            outcomes.ok += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        outcomes.failed.append(f"{method} {path}: {type(exc).__name__}")


async def traffic(proxy_port: int, methods: tuple[str, ...]) -> Outcomes:
    """Sequential requests around the idle timer, then concurrent ones across the maximum age."""
    outcomes = Outcomes()
    base = f"http://127.0.0.1:{proxy_port}"
    async with aiohttp.ClientSession() as session:
        for i, pause in enumerate(PAUSES):
            await one(session, base, methods[i % len(methods)], f"/seq/{i}", outcomes)
            await asyncio.sleep(pause * IDLE)

        async def worker(w: int) -> None:
            deadline, n = time.monotonic() + AGE_PHASE, 0
            while time.monotonic() < deadline and n < 1000:
                await one(session, base, methods[(w + n) % len(methods)], f"/busy/{w}/{n}", outcomes)
                n += 1
                await asyncio.sleep(0.01 * (w + 1))  # staggered: some gaps meet the age timer

        await asyncio.gather(*(worker(w) for w in range(WORKERS)))
    return outcomes


@pytest.mark.parametrize("protocol, impl", UPSTREAMS)
async def test_idempotent_requests_survive_the_simulators_idle_and_age_closes(limited_sim, protocol, impl):
    sim = limited_sim
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=protocol,
                             h2_implementation=impl, idle_timeout=90) as proxy:
        outcomes = await traffic(proxy.port, IDEMPOTENT)
    all_closes = await asyncio.to_thread(sim.stop)
    closes = all_closes.get("HTTP/2" if protocol == "h2" else "HTTP/1.1", {})
    print(outcomes.report(all_closes))
    long_pauses = sum(1 for p in PAUSES if p > 1.2)
    assert closes.get("idle", 0) >= long_pauses and closes.get("max_age", 0) >= 1, outcomes.report(all_closes)
    assert outcomes.ok > len(PAUSES) and not outcomes.failed, outcomes.report(all_closes)


@pytest.mark.parametrize("protocol, impl", UPSTREAMS)
async def test_every_request_survives_when_the_proxy_retires_first(limited_sim, protocol, impl):
    sim = limited_sim
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=protocol,
                             h2_implementation=impl, idle_timeout=IDLE / 2, max_connection_age=AGE / 2) as proxy:
        outcomes = await traffic(proxy.port, ("POST", *IDEMPOTENT))
    closes = await asyncio.to_thread(sim.stop)
    print(outcomes.report(closes))
    assert outcomes.ok > len(PAUSES) and not outcomes.failed, outcomes.report(closes)
