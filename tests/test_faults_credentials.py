"""Credential faults, through the proxy: botocore's container provider against a local endpoint
(`support.creds_server`) that goes down, answers garbage or expired keys, or is slow.

What the client must see: 503 `credentials_unavailable` with a reason and `Retry-After` whenever
there is no valid key (the upstream sees zero requests: nothing is ever forwarded unsigned), the
last good key while it is still valid, and no request ever waiting on a refresh in progress.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest
from support.creds_server import EXPIRED, GARBAGE, OK, CredsServer, isolate_aws_env
from support.proxy import running_proxy
from test_faults_upstream import Exchange, ScriptedH2Upstream, get, h2_upstream, raw_request, wait_until

from sigv4proxy.aws.credentials import CredentialStore, RefreshPolicy

# Short constants: refresh at half the lifetime, retry failures every ~0.2-1 s.
FAST = RefreshPolicy(lead=1.0, min_delay=0.05, backoff_initial=0.2, backoff_max=1.0)
_CREDENTIAL = re.compile(r"Credential=([A-Z0-9]+)/")


async def key_echo(ex: Exchange) -> None:
    """Answers with the access key the request was signed with (the upstream's view)."""
    auth = ex.headers.get(b"authorization", b"").decode()
    match = _CREDENTIAL.search(auth)
    ex.respond(200, json.dumps({"access_key": match.group(1) if match else None}).encode())


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)
    return monkeypatch


async def signed_with(port: int) -> tuple[int, str | None, bytes, str | None]:
    resp = await raw_request(port, get("/whoami"))
    key = json.loads(resp.body)["access_key"] if resp.status == 200 else None
    return resp.status, key, resp.body, resp.header("x-sigv4proxy-error")


async def readiness(admin_port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
            return resp.status, await resp.text()


async def test_endpoint_down_at_start_fails_closed_then_recovers(aws_env):
    async with CredsServer(lifetime=30) as creds, ScriptedH2Upstream(key_echo) as upstream:
        creds.apply_env(aws_env)
        await creds.refuse()
        store = CredentialStore.from_botocore(refresh_policy=FAST)
        async with running_proxy(credentials=store, **h2_upstream(upstream.port)) as proxy:
            status, text = await readiness(proxy.admin_port)
            assert status == 503 and "no credentials" in text
            resp = await raw_request(proxy.port, get("/x"))
            assert resp.status == 503 and resp.header("x-sigv4proxy-error") == "credentials_unavailable"
            assert resp.header("retry-after") and resp.body == b"sigv4proxy: no credentials\n"
            assert upstream.log.connections == 0 and upstream.log.requests == []  # never unsigned
            unavailable = proxy.metrics.registry.get_sample_value(
                "sigv4proxy_errors_total", {"kind": "credentials_unavailable"})
            assert unavailable == 1
            await creds.accept()
            await wait_until(lambda: store.ready()[0], timeout=10)
            status, key, _, _ = await signed_with(proxy.port)
            assert status == 200 and creds.is_issued(key)
            assert (await readiness(proxy.admin_port))[0] == 200


async def test_endpoint_down_later_uses_the_last_good_key_until_expiry_then_503(aws_env):
    async with CredsServer(lifetime=4.0) as creds, ScriptedH2Upstream(key_echo) as upstream:
        creds.apply_env(aws_env)
        store = CredentialStore.from_botocore(refresh_policy=FAST)
        async with running_proxy(credentials=store, **h2_upstream(upstream.port)) as proxy:
            status, good_key, _, _ = await signed_with(proxy.port)
            assert status == 200
            expiry = store.expiry
            await creds.refuse()
            served = 0
            while time.time() < expiry - 0.4:  # bounded by the key's 4 s lifetime
                status, key, _, _ = await signed_with(proxy.port)
                assert (status, key) == (200, good_key)
                served += 1
                await asyncio.sleep(0.1)
            assert served >= 5 and store.refresh_success == 1  # no new key could be fetched
            await wait_until(lambda: time.time() > expiry + 0.05, timeout=2)
            before = len(upstream.log.requests)
            status, _, body, kind = await signed_with(proxy.port)
            assert (status, kind) == (503, "credentials_unavailable")
            assert body == b"sigv4proxy: credentials expired\n"
            assert len(upstream.log.requests) == before  # the expired key was not used
            ready, text = await readiness(proxy.admin_port)
            assert ready == 503 and "credentials expired" in text


@pytest.mark.parametrize("mode", [GARBAGE, EXPIRED])
async def test_garbage_or_expired_keys_at_start_fail_closed(aws_env, mode):
    async with CredsServer(lifetime=30) as creds, ScriptedH2Upstream(key_echo) as upstream:
        creds.apply_env(aws_env)
        creds.mode = mode
        store = CredentialStore.from_botocore(
            refresh_policy=RefreshPolicy(backoff_initial=30, backoff_max=60))
        async with running_proxy(credentials=store, **h2_upstream(upstream.port)) as proxy:
            status, _, body, kind = await signed_with(proxy.port)
            assert (status, kind) == (503, "credentials_unavailable")
            ready, text = await readiness(proxy.admin_port)
            assert ready == 503 and store.last_error and store.last_error in text
            assert upstream.log.requests == []
            for issued in creds.issued:  # an expired key is not used, nor shown
                assert issued.access_key not in text and issued.secret_key not in text


async def test_garbage_later_keeps_serving_with_the_last_good_key(aws_env):
    async with CredsServer(lifetime=8.0) as creds, ScriptedH2Upstream(key_echo) as upstream:
        creds.apply_env(aws_env)
        # Refresh after ~1 s: botocore spends ~3 s retrying a garbage answer before it fails.
        early = RefreshPolicy(lead=7.0, floor_fraction=0.1, min_delay=0.05, backoff_initial=0.2,
                              backoff_max=1.0)
        store = CredentialStore.from_botocore(refresh_policy=early)
        async with running_proxy(credentials=store, **h2_upstream(upstream.port)) as proxy:
            _, good_key, _, _ = await signed_with(proxy.port)
            creds.mode = GARBAGE
            await wait_until(lambda: store.refresh_failure >= 1, timeout=10)
            status, key, _, _ = await signed_with(proxy.port)
            assert (status, key) == (200, good_key)
            creds.mode = OK
            await wait_until(lambda: store.snapshot().access_key != good_key, timeout=10)
            status, key, _, _ = await signed_with(proxy.port)
            assert status == 200 and key != good_key and creds.is_issued(key)


async def test_slow_refresh_never_delays_requests(aws_env):
    async with CredsServer(lifetime=5.0) as creds, ScriptedH2Upstream(key_echo) as upstream:
        creds.apply_env(aws_env)
        store = CredentialStore.from_botocore(refresh_policy=FAST)
        async with running_proxy(credentials=store, **h2_upstream(upstream.port)) as proxy:
            _, first_key, _, _ = await signed_with(proxy.port)
            creds.slow_seconds = 1.5
            fetches = creds.fetches
            served_during_refresh = 0
            worst = 0.0
            deadline = time.monotonic() + 10
            while store.snapshot().access_key == first_key and time.monotonic() < deadline:
                started = time.monotonic()
                status, key, _, _ = await signed_with(proxy.port)
                worst = max(worst, time.monotonic() - started)
                assert status == 200
                if creds.fetches > fetches and key == first_key:
                    served_during_refresh += 1  # a refresh is in flight; the old key serves
                await asyncio.sleep(0.05)
            assert store.snapshot().access_key != first_key, "the slow refresh never completed"
            assert served_during_refresh >= 5
            assert worst < 0.75, f"a request waited {worst:.2f}s"  # never the 1.5 s fetch
