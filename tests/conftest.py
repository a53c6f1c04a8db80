"""Shared test fixtures: the event-loop watchdog, the path to the shared SigV4 corpus, and `sim`:
a Lattice simulator on loopback that re-verifies every signature (files may override it)."""

from __future__ import annotations

import asyncio
import inspect
import os
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("SIGV4PROXY_SHARED", ROOT.parent / "shared"))
TESTSUITE = pathlib.Path(os.environ.get("SIGV4_TESTSUITE", SHARED / "sigv4-testsuite"))

# A callback that holds the loop longer than this fails the test (generous: the machine is shared).
MAX_LOOP_LAG = float(os.environ.get("SIGV4PROXY_MAX_LOOP_LAG", "1.0"))


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    """(certificate chain, key, CA) files: a trustme certificate for the Lattice host and 127.0.0.1."""
    import trustme

    from support.proxy import LATTICE_HOST

    ca = trustme.CA()
    cert = ca.issue_cert(LATTICE_HOST, "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path, ca_path = d / "cert.pem", d / "key.pem", d / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return str(cert_path), str(key_path), str(ca_path)


@pytest.fixture
async def sim(tmp_path):
    from sigv4proxy.sim.server import SimConfig, start_simulator
    from support.proxy import SERVICE_ARN, write_identities

    server = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)),
                                             policy=None, service_arn=SERVICE_ARN))
    yield server
    await server.aclose()


@pytest.fixture
async def tls_sim(tmp_path, tls_material):
    """(simulator over TLS, HTTP/2 or HTTP/1.1 by ALPN; the CA file that verifies it)."""
    from sigv4proxy.sim.server import SimConfig, start_simulator
    from support.proxy import SERVICE_ARN, write_identities

    cert, key, ca = tls_material
    server = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)),
                                             policy=None, service_arn=SERVICE_ARN, tls_cert=cert, tls_key=key))
    yield server, ca
    await server.aclose()


MISSING_TESTSUITE = f"SigV4 test suite not found at {TESTSUITE} (set SIGV4_TESTSUITE)"


@pytest.fixture
def testsuite_dir() -> pathlib.Path:
    if not TESTSUITE.is_dir():
        pytest.skip(MISSING_TESTSUITE)
    return TESTSUITE


def corpus_params(cases: list) -> list:
    """Parametrize values from the corpus; without it, one case that skips saying why (pytest's
    own skip of an empty parameter set names no reason)."""
    if cases or TESTSUITE.is_dir():
        return cases
    return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING_TESTSUITE), id="no-testsuite")]


class LoopWatchdog:
    """Ticks every 10 ms and records the worst delay: a blocked event loop shows up as lag."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        interval = 0.01
        while True:
            start = time.perf_counter()
            await asyncio.sleep(interval)
            lag = time.perf_counter() - start - interval
            if lag > self.max_lag:
                self.max_lag = lag

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


@pytest.fixture
async def loop_watchdog():
    """Fails the test if anything blocked the event loop for more than MAX_LOOP_LAG seconds."""
    dog = LoopWatchdog()
    dog.start()
    yield dog
    await dog.stop()
    assert dog.max_lag < MAX_LOOP_LAG, f"event loop blocked for {dog.max_lag:.3f}s"


def pytest_collection_modifyitems(config, items):
    # Every async test runs under the watchdog.
    for item in items:
        func = getattr(item, "function", None)
        if func is not None and inspect.iscoroutinefunction(func):
            if "loop_watchdog" not in item.fixturenames:
                item.fixturenames.append("loop_watchdog")
