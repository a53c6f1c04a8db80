"""Tests for sigv4proxy.aws.credentials: the refresh policy (pure), the store's contract (scripted
providers in the real worker thread), and botocore's chain against a real local container
credentials endpoint and a real local STS (moto) over loopback sockets."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigv4proxy.aws.credentials import (
    BotocoreProvider,
    ChainSettings,
    ChildProcessProvider,
    CredentialFetchError,
    CredentialStore,
    RefreshPolicy,
    quiet_third_party_loggers,
)
from sigv4proxy.errors import CredentialsUnavailable
from sigv4proxy.aws.signing import Credentials
from support.creds_server import (
    ERROR,
    EXPIRED,
    GARBAGE,
    INCOMPLETE,
    OK,
    CredsServer,
    ThreadedCredsServer,
    isolate_aws_env,
)

# Small timings for tests: refresh 1 s before expiry at the latest, retry quickly.
FAST = RefreshPolicy(lead=1.0, min_delay=0.05, backoff_initial=0.2, backoff_max=1.0)
ROLE_ARN = "arn:aws:iam::123456789012:role/lattice-caller"


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


class ScriptedProvider:
    """Hands out the given results in order (an exception is raised); counts calls."""

    def __init__(self, *results: Credentials | Exception) -> None:
        self.results = list(results)
        self.calls = 0

    def fetch(self) -> Credentials:
        self.calls += 1
        result = self.results[min(self.calls, len(self.results)) - 1]
        if isinstance(result, Exception):
            raise result
        return result


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)
    return monkeypatch


@pytest.fixture
async def creds_server():
    async with CredsServer(lifetime=6.0) as server:
        yield server


@pytest.fixture
async def stores():
    """Stores created through this list are closed at teardown, whatever the test did."""
    made: list[CredentialStore] = []
    yield made
    for store in made:
        await store.aclose()


# --- the refresh policy (pure) ---
def test_policy_refresh_delay_hand_computed():
    policy = RefreshPolicy()  # lead 300 s, half lifetime, floor a quarter, jitter 10 %
    assert policy.refresh_delay(3600, 0.0) == 1800  # half comes before 5 min ahead
    assert policy.refresh_delay(3600, 1.0) == pytest.approx(1980)
    assert policy.refresh_delay(3600, -1.0) == pytest.approx(1620)
    assert policy.refresh_delay(400, 0.0) == 100  # 5 min before expiry comes first
    assert policy.refresh_delay(300, 0.0) == 75  # inside the lead window: a quarter, not now
    assert policy.refresh_delay(2, 0.0) == 1.0  # never below min_delay


@given(remaining=st.floats(4.0, 43200.0), sample=st.floats(-1.0, 1.0))
def test_policy_refresh_always_before_expiry(remaining, sample):
    policy = RefreshPolicy()
    delay = policy.refresh_delay(remaining, sample)
    assert remaining * 0.25 * 0.9 - 1e-9 <= delay or delay == policy.min_delay
    assert delay <= remaining * 0.5 * 1.1 + 1e-9 or delay == policy.min_delay
    assert delay < remaining
    if remaining > 600 + 1:
        assert delay >= remaining * 0.5 * 0.9 - 1e-9  # long-lived: at about half the lifetime
    if remaining > 301:
        assert delay <= max(remaining - 300, remaining * 0.25) * 1.1 + 1e-9


def test_policy_backoff_doubles_bounded_and_not_past_expiry():
    policy = RefreshPolicy()  # 1 s doubling to 60 s
    assert [policy.retry_delay(n, None, 0.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.retry_delay(10_000, None, 0.0) == 60  # a long outage does not overflow
    assert policy.retry_delay(6, 10.0, 0.0) == 5.0  # halfway to the expiry, not 32 s later
    assert policy.retry_delay(6, 0.5, 0.0) == 1.0  # min_delay still bounds the rate
    assert policy.retry_delay(3, None, 1.0) == pytest.approx(4.4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(jitter=0.7), dict(min_delay=0), dict(backoff_max=0.5), dict(floor_fraction=0.6),
     dict(lead=-1), dict(backoff_factor=0.5)],
)
def test_policy_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RefreshPolicy(**kwargs)


# --- the store's contract, with scripted providers ---
async def test_static_store_is_ready_without_start_and_never_refreshes():
    store = CredentialStore.static("AKIDSTATIC", "static-secret", "static-token")
    assert store.ready() == (True, "")
    creds = store.snapshot()
    assert (creds.access_key, creds.secret_key, creds.token, creds.expiry) == (
        "AKIDSTATIC", "static-secret", "static-token", None)
    assert store.expiry is None
    await store.start()
    await asyncio.sleep(0.2)
    assert store.refresh_success == 1 and store.refresh_failure == 0
    assert store.snapshot() is creds
    await store.aclose()


@pytest.mark.parametrize("access_key, secret_key, token", [
    ("", "s", None), ("AKID", "", None), ("AKID WITH SPACE", "s", None),
    ("AKID", "s", "tokval\r\nX: 1"),
])
def test_static_rejects_unusable_values_without_echoing_them(access_key, secret_key, token):
    with pytest.raises(ValueError) as info:
        CredentialStore.static(access_key, secret_key, token)
    assert "tokval" not in str(info.value) and "SPACE" not in str(info.value)


async def test_reprs_never_show_secrets(aws_env):
    static = CredentialStore.static("AKIDREPR", "repr-secret-value", "repr-session-token")
    botocore_store = CredentialStore.from_botocore(role_arn=ROLE_ARN,
                                                   external_id="repr-external-id")
    texts = [repr(static), str(static), repr(static.snapshot()), str(static.snapshot()),
             repr(botocore_store), str(botocore_store)]
    for text in texts:
        for secret in ("repr-secret-value", "repr-session-token", "repr-external-id"):
            assert secret not in text
    assert "AKIDREPR" in repr(static.snapshot())  # the key id itself is fine to show


async def test_failed_first_fetch_does_not_raise_and_fails_closed(stores):
    outcomes: list[str] = []
    store = CredentialStore(ScriptedProvider(CredentialFetchError("endpoint said no")),
                            refresh_policy=FAST)
    store.on_refresh = outcomes.append
    stores.append(store)
    assert store.ready() == (False, "credentials not loaded yet")
    await store.start()  # must not raise
    ok, reason = store.ready()
    assert not ok and "endpoint said no" in reason
    assert store.last_error == "endpoint said no"
    assert store.refresh_failure == 1 and store.refresh_success == 0 and outcomes == ["failure"]
    with pytest.raises(CredentialsUnavailable) as info:
        store.snapshot()
    assert info.value.status == 503


async def test_unknown_provider_errors_are_reported_by_type_only(stores):
    store = CredentialStore(ScriptedProvider(OSError("body: secret-looking-text")),
                            refresh_policy=FAST)
    stores.append(store)
    await store.start()
    assert store.last_error == "fetch failed (OSError)"


async def test_snapshot_fails_closed_at_expiry_by_the_clock(stores):
    now = [1_000_000.0]
    creds = Credentials("AKIDCLOCK", "clock-secret", "clock-token", expiry=now[0] + 3600)
    store = CredentialStore(ScriptedProvider(creds), clock=lambda: now[0])
    stores.append(store)
    await store.start()
    assert store.snapshot() is creds and store.expiry == creds.expiry
    now[0] = creds.expiry - 0.001
    assert store.snapshot() is creds
    now[0] = creds.expiry
    with pytest.raises(CredentialsUnavailable):
        store.snapshot()
    assert store.ready() == (False, "credentials expired")


async def test_already_expired_fetch_is_a_failure_and_keeps_last_good(stores):
    good = Credentials("AKIDGOOD", "good-secret", "good-token", expiry=time.time() + 5)
    stale = Credentials("AKIDSTALE", "stale-secret", "stale-token", expiry=time.time() - 1)
    provider = ScriptedProvider(good, stale)
    store = CredentialStore(provider, refresh_policy=RefreshPolicy(
        lead=4.9, min_delay=0.05, backoff_initial=0.1, backoff_max=0.2))
    stores.append(store)
    await store.start()
    await wait_until(lambda: store.refresh_failure >= 2, timeout=5)
    assert store.snapshot() is good
    assert store.last_error == "fetched credentials are already expired"


async def test_on_refresh_hook_that_raises_does_not_stop_refreshing(stores):
    creds = Credentials("AKIDHOOK", "hook-secret", None, expiry=time.time() + 3)
    provider = ScriptedProvider(creds)

    def broken_hook(outcome: str) -> None:
        raise RuntimeError("metrics are down")

    store = CredentialStore(provider, refresh_policy=RefreshPolicy(
        lead=2.9, min_delay=0.05, backoff_initial=0.1, backoff_max=0.2))
    store.on_refresh = broken_hook
    stores.append(store)
    await store.start()
    await wait_until(lambda: store.refresh_success >= 3, timeout=5)


async def test_aclose_is_prompt_while_a_fetch_is_blocked():
    release = threading.Event()
    entered = threading.Event()

    class BlockingProvider:
        def fetch(self) -> Credentials:
            entered.set()
            release.wait(timeout=10)
            return Credentials("AKIDLATE", "late-secret", None, time.time() + 60)

    store = CredentialStore(BlockingProvider(), refresh_policy=FAST)
    start = asyncio.get_running_loop().create_task(store.start())
    try:
        await wait_until(entered.is_set, timeout=5)
        started = time.monotonic()
        start.cancel()
        await store.aclose()
        assert time.monotonic() - started < 1.0
        with pytest.raises(asyncio.CancelledError):
            await start
        assert store.refresh_success == 0
    finally:
        release.set()
    await store.aclose()  # idempotent


def test_quiet_third_party_loggers_overrides_debug_levels():
    names = ["botocore", "botocore.credentials", "urllib3.connectionpool", "hpack", "hpack.hpack",
             "h2", "h2.connection"]
    saved = {name: logging.getLogger(name).level for name in names}
    root_level = logging.root.level
    try:
        logging.root.setLevel(logging.DEBUG)
        for name in names:
            logging.getLogger(name).setLevel(logging.DEBUG)
        quiet_third_party_loggers()
        for name in names:
            logger = logging.getLogger(name)
            assert logger.getEffectiveLevel() >= logging.WARNING, name
            assert not logger.isEnabledFor(logging.INFO), name
        assert logging.getLogger("sigv4proxy").isEnabledFor(logging.DEBUG)  # ours untouched
    finally:
        logging.root.setLevel(root_level)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_botocore_provider_validates_duration():
    with pytest.raises(ValueError):
        BotocoreProvider(duration_seconds=60)


# --- botocore's chain against a real local container credentials endpoint ---
async def test_keys_rotate_before_expiry_and_no_expired_snapshot_is_read(
        aws_env, creds_server, stores):
    creds_server.apply_env(aws_env)
    store = CredentialStore.from_botocore(refresh_policy=FAST)
    stores.append(store)
    await store.start()
    assert store.ready() == (True, "")
    changes: list[tuple[float, Credentials]] = [(time.time(), store.snapshot())]
    deadline = time.monotonic() + 15
    while len(changes) < 3 and time.monotonic() < deadline:  # about 6 s: a refresh every ~3 s
        creds = store.snapshot()  # must never raise: the old key is valid until the new arrives
        now = time.time()
        assert creds.expiry is not None and creds.expiry > now
        if creds.access_key != changes[-1][1].access_key:
            assert now < changes[-1][1].expiry  # rotated before the previous key expired
            changes.append((now, creds))
        await asyncio.sleep(0.02)
    assert len(changes) == 3, f"saw {len(changes)} keys"
    issued = {key.access_key: key for key in creds_server.issued}
    for _, creds in changes:  # the snapshot is exactly what the endpoint issued
        key = issued[creds.access_key]
        assert (creds.secret_key, creds.token) == (key.secret_key, key.token)
        assert creds.expiry == pytest.approx(key.expiry, abs=0.002)
    # One request per refresh: botocore is not left to refetch short-lived keys on its own.
    assert creds_server.fetches == store.refresh_success
    assert creds_server.unauthorized == 0


async def test_token_file_is_read_per_fetch(aws_env, creds_server, stores, tmp_path):
    token_file = tmp_path / "eks-pod-identity-token"
    creds_server.apply_env(aws_env, token_file=token_file)
    good_token = token_file.read_text()
    token_file.write_text("not-the-token")
    store = CredentialStore.from_botocore(refresh_policy=FAST)
    stores.append(store)
    await store.start()  # rejected with 401 (botocore retries 3 times, ~3 s)
    assert not store.ready()[0] and creds_server.unauthorized >= 1
    assert "not-the-token" not in (store.last_error or "")
    token_file.write_text(good_token)  # the agent rotated the token file
    await wait_until(lambda: store.ready()[0], timeout=10)
    assert creds_server.is_issued(store.snapshot().access_key)


async def test_slow_endpoint_never_delays_the_event_loop(aws_env, creds_server, stores):
    creds_server.apply_env(aws_env)
    store = CredentialStore.from_botocore(refresh_policy=FAST)
    stores.append(store)
    await store.start()
    first = store.snapshot()
    creds_server.slow_seconds = 2.5
    fetches_before = creds_server.fetches
    worst_lag = 0.0
    worst_snapshot = 0.0
    fetch_seen_at = None
    deadline = time.monotonic() + 15
    while store.refresh_success < 2 and time.monotonic() < deadline:
        tick = time.perf_counter()
        await asyncio.sleep(0.01)
        worst_lag = max(worst_lag, time.perf_counter() - tick - 0.01)
        tick = time.perf_counter()
        assert store.snapshot() is not None  # served from the last good key meanwhile
        worst_snapshot = max(worst_snapshot, time.perf_counter() - tick)
        if fetch_seen_at is None and creds_server.fetches > fetches_before:
            fetch_seen_at = time.monotonic()
    assert store.refresh_success == 2 and fetch_seen_at is not None
    assert time.monotonic() - fetch_seen_at >= 2.0  # the refresh really was slow...
    assert worst_lag < 0.5, f"event loop lagged {worst_lag:.3f}s"  # ...and the loop never waited
    assert worst_snapshot < 0.1
    assert store.snapshot().access_key != first.access_key


async def test_outage_keeps_last_good_then_fails_closed_then_recovers(aws_env, stores):
    async with CredsServer(lifetime=8.0) as server:
        server.apply_env(aws_env)
        store = CredentialStore.from_botocore(refresh_policy=FAST)
        stores.append(store)
        await store.start()
        good = store.snapshot()
        await server.refuse()  # connection refused from now on
        # Until the key truly expires, every read gets it, even after refreshes have failed.
        while time.time() < good.expiry - 0.05:
            assert store.snapshot() is good
            await asyncio.sleep(0.02)
        assert store.refresh_failure >= 1 and store.ready()[0]
        await wait_until(lambda: time.time() > good.expiry, timeout=1)
        with pytest.raises(CredentialsUnavailable):
            store.snapshot()
        ok, reason = store.ready()
        assert not ok and reason.startswith("credentials expired")
        await server.accept()
        await wait_until(lambda: store.ready()[0], timeout=10)
        recovered = store.snapshot()
        assert recovered.access_key != good.access_key and server.is_issued(recovered.access_key)
        assert store.last_error is None


@pytest.mark.parametrize("mode", [ERROR, GARBAGE, INCOMPLETE, EXPIRED])
async def test_bad_answers_are_refresh_failures(aws_env, creds_server, stores, mode):
    creds_server.apply_env(aws_env)
    creds_server.mode = mode
    store = CredentialStore.from_botocore(refresh_policy=RefreshPolicy(backoff_initial=30,
                                                                       backoff_max=60))
    stores.append(store)
    await store.start()  # 500 and garbage take ~3 s: botocore retries them
    assert store.refresh_failure == 1 and store.refresh_success == 0
    assert creds_server.fetches >= 1
    with pytest.raises(CredentialsUnavailable):
        store.snapshot()
    ok, reason = store.ready()
    assert not ok and store.last_error and store.last_error in reason
    assert "html" not in reason and "internal error" not in reason  # no response body echoed
    for key in creds_server.issued:  # nor a secret of a rejected (expired) key
        assert key.secret_key not in reason and key.access_key not in reason


async def test_logs_carry_no_secrets(aws_env, creds_server, stores, caplog):
    saved = {name: logging.getLogger(name).level for name in ("botocore", "urllib3")}
    quiet_third_party_loggers()
    caplog.set_level(logging.DEBUG)
    try:
        creds_server.apply_env(aws_env)
        store = CredentialStore.from_botocore(refresh_policy=FAST)
        stores.append(store)
        await store.start()
        creds_server.mode = INCOMPLETE
        await wait_until(lambda: store.refresh_failure >= 1, timeout=10)
        creds_server.mode = OK
        await wait_until(lambda: store.refresh_success >= 2, timeout=10)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    text = caplog.text
    assert "credentials refreshed" in text and "credential refresh failed" in text
    for key in creds_server.issued:
        assert key.secret_key not in text and key.token not in text
        assert key.access_key not in text  # a prefix at most
    assert creds_server.token not in text


def test_threaded_server_serves_sync_botocore(aws_env):
    with ThreadedCredsServer(lifetime=30.0) as server:
        server.apply_env(aws_env)
        creds = BotocoreProvider().fetch()  # plain sync code, as in the store's worker thread
        assert server.is_issued(creds.access_key)
        assert creds.expiry == pytest.approx(time.time() + 30, abs=5)
        assert server.fetches == 1


# --- AssumeRole on top of the chain, against a real local STS (moto's server) ---
@pytest.fixture(scope="module")
def local_sts():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def assumed_role_record(access_key: str):
    """moto's own record of the AssumeRole call that issued `access_key` (same process)."""
    from moto.sts.models import sts_backends

    for role in sts_backends["123456789012"]["aws"].assumed_roles:
        if role.access_key_id == access_key:
            return role
    raise AssertionError("moto has no record of this key")


async def test_assume_role_passes_external_id_session_name_and_duration(
        aws_env, creds_server, stores, local_sts):
    creds_server.apply_env(aws_env)  # the base credentials come from the chain
    store = CredentialStore.from_botocore(
        role_arn=ROLE_ARN, role_session_name="sigv4proxy-test", external_id="ext-7f3a",
        duration_seconds=1800, region="us-west-2", sts_endpoint_url=local_sts,
        refresh_policy=FAST)
    stores.append(store)
    await store.start()
    assert store.ready() == (True, "")
    creds = store.snapshot()
    assert not creds_server.is_issued(creds.access_key)  # the role's key, not the base key
    assert creds_server.fetches == 1
    assert creds.expiry == pytest.approx(time.time() + 1800, abs=30)
    record = assumed_role_record(creds.access_key)
    assert (record.role_arn, record.session_name, record.external_id) == (
        ROLE_ARN, "sigv4proxy-test", "ext-7f3a")
    assert (record.secret_access_key, record.session_token) == (creds.secret_key, creds.token)
    # The assumed credentials work against the same STS: it knows who we are.
    identity = await asyncio.to_thread(caller_identity, local_sts, creds)
    assert identity.endswith(":assumed-role/lattice-caller/sigv4proxy-test")


def caller_identity(endpoint: str, creds: Credentials) -> str:
    import botocore.session

    client = botocore.session.Session().create_client(
        "sts", region_name="us-west-2", endpoint_url=endpoint, aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key, aws_session_token=creds.token)
    try:
        return client.get_caller_identity()["Arn"]
    finally:
        client.close()


async def test_assume_role_honours_aws_endpoint_url_sts(aws_env, creds_server, stores, local_sts):
    creds_server.apply_env(aws_env)
    aws_env.setenv("AWS_ENDPOINT_URL_STS", local_sts)
    store = CredentialStore.from_botocore(role_arn=ROLE_ARN, refresh_policy=FAST)
    stores.append(store)
    await store.start()
    record = assumed_role_record(store.snapshot().access_key)
    assert (record.session_name, record.external_id) == ("sigv4proxy", None)
    assert store.expiry == pytest.approx(time.time() + 3600, abs=30)  # the default duration


async def test_assume_role_failure_is_a_refresh_failure(aws_env, creds_server, stores):
    creds_server.apply_env(aws_env)
    async with CredsServer() as closed:  # a port that refuses connections once stopped
        dead_url = f"http://127.0.0.1:{closed.port}"
    store = CredentialStore.from_botocore(role_arn=ROLE_ARN, sts_endpoint_url=dead_url,
                                          refresh_policy=RefreshPolicy(backoff_initial=30,
                                                                       backoff_max=60))
    stores.append(store)
    await store.start()
    assert store.refresh_failure == 1 and not store.ready()[0]
    assert store.last_error == "AssumeRole failed (EndpointConnectionError)"


async def test_irsa_web_identity_chain_against_local_sts(aws_env, stores, local_sts, tmp_path):
    token_file = tmp_path / "eks.amazonaws.com-serviceaccount-token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln")
    aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    aws_env.setenv("AWS_ROLE_ARN", ROLE_ARN)
    aws_env.setenv("AWS_ROLE_SESSION_NAME", "irsa-session")
    aws_env.setenv("AWS_ENDPOINT_URL_STS", local_sts)
    store = CredentialStore.from_botocore(refresh_policy=FAST)
    stores.append(store)
    await store.start()
    assert store.ready() == (True, "")
    record = assumed_role_record(store.snapshot().access_key)
    assert (record.role_arn, record.session_name) == (ROLE_ARN, "irsa-session")
    expiration = record.expiration  # moto keeps naive UTC
    if expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=datetime.timezone.utc)
    assert store.expiry == pytest.approx(expiration.timestamp(), abs=1)


# --- botocore's chain in a child process (what `serve` uses) ---

async def test_child_process_fetch_resolves_the_chain(aws_env, creds_server):
    creds_server.apply_env(aws_env)  # the child inherits this environment
    provider = ChildProcessProvider(ChainSettings(region="us-west-2"))
    creds = await asyncio.to_thread(provider.fetch)
    assert creds_server.is_issued(creds.access_key) and creds_server.fetches == 1
    assert creds.secret_key and creds.token and creds.expiry == pytest.approx(time.time() + 6, abs=3)


async def test_child_process_failures_are_safe_reasons(aws_env, creds_server):
    provider = ChildProcessProvider(ChainSettings())
    with pytest.raises(CredentialFetchError, match=r"^no credentials in the default chain$"):
        await asyncio.to_thread(provider.fetch)  # nothing in the isolated environment
    creds_server.apply_env(aws_env)
    creds_server.mode = GARBAGE
    with pytest.raises(CredentialFetchError) as caught:
        await asyncio.to_thread(provider.fetch)
    assert caught.value.args[0].startswith("credential chain failed (")  # a type, never the body


async def test_child_process_timeout_and_close_end_the_child(aws_env, creds_server):
    creds_server.apply_env(aws_env)
    creds_server.slow_seconds = 5.0
    slow = ChildProcessProvider(ChainSettings(), timeout=1.0)
    began = time.monotonic()
    with pytest.raises(CredentialFetchError, match="timed out after 1s"):
        await asyncio.to_thread(slow.fetch)
    assert time.monotonic() - began < 4
    closing = ChildProcessProvider(ChainSettings())
    closing.begin()
    child = closing._child
    closing.close()  # as CredentialStore.aclose does while a fetch runs
    assert child.wait(timeout=5) != 0


def test_a_serving_store_never_imports_botocore(tmp_path):
    """`serve`'s store (in_child_process) is ready with no botocore in the serving process."""
    code = ("import asyncio, sys; from sigv4proxy.aws.credentials import CredentialStore; "
            "store = CredentialStore.from_botocore(in_child_process=True); asyncio.run(store.start()); "
            "print(store.ready()[0], store.snapshot().access_key, 'botocore' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIDCHILDPROCESS0001", AWS_SECRET_ACCESS_KEY="child-secret",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["True", "AKIDCHILDPROCESS0001", "False"], out.stderr[-2000:]
