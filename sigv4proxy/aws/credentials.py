"""The credential store: the one owner of AWS credentials and their refresh.

Owns: the refresh of credentials from a source (`credential_sources`: botocore's default chain,
optionally AssumeRole on top, or fixed keys), the refresh schedule (ahead of expiry, jittered,
exponential backoff on failure) and the current snapshot that the signer reads with no await and
no lock.
Must never: call botocore on the event loop (its fetches do blocking network I/O, so they run in
the store's own worker thread), hand out an expired snapshot (it fails closed with
`CredentialsUnavailable`), or put a secret key, session token or signature in a log, a repr or an
error message (logs carry an access key id prefix at most).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sigv4proxy.aws.credential_sources import (  # re-exported: the store's public companions
    THIRD_PARTY_LOGGERS,
    BotocoreProvider,
    ChainSettings,
    ChildProcessProvider,
    CredentialFetchError,
    CredentialProvider,
    StaticProvider,
    checked_credentials,
    key_hint,
    quiet_third_party_loggers,
)
from sigv4proxy.aws.signing import Credentials
from sigv4proxy.errors import CredentialsUnavailable

__all__ = [
    "THIRD_PARTY_LOGGERS",
    "BotocoreProvider",
    "CredentialFetchError",
    "CredentialProvider",
    "CredentialStore",
    "RefreshPolicy",
    "StaticProvider",
    "checked_credentials",
    "key_hint",
    "quiet_third_party_loggers",
]

if TYPE_CHECKING:
    from sigv4proxy.config import ProxyConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When to refresh. Every timing constant lives here so that tests can shrink them.

    A refresh is due at half the remaining lifetime or `lead` seconds before expiry, whichever
    comes first, but never sooner than `floor_fraction` of the remaining lifetime (credentials that
    arrive already inside the lead window are refreshed a few times, not hammered).
    """

    lead: float = 300.0
    lifetime_fraction: float = 0.5
    floor_fraction: float = 0.25
    jitter: float = 0.1  # ± this fraction of every delay
    min_delay: float = 1.0
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.floor_fraction <= self.lifetime_fraction < 1:
            raise ValueError("need 0 < floor_fraction <= lifetime_fraction < 1")
        if not 0 <= self.jitter < 0.5:
            raise ValueError("jitter must be in [0, 0.5)")
        if self.lead < 0 or self.min_delay <= 0 or self.backoff_initial <= 0:
            raise ValueError("lead must be >= 0, min_delay and backoff_initial > 0")
        if self.backoff_factor < 1 or self.backoff_max < self.backoff_initial:
            raise ValueError("backoff must not shrink")

    def _jittered(self, delay: float, sample: float) -> float:
        # `sample` is uniform in [-1, 1]; passed in so that the policy stays pure and testable.
        return delay * (1.0 + self.jitter * sample)

    def refresh_delay(self, remaining: float, sample: float) -> float:
        """Seconds until the next refresh of credentials with `remaining` seconds to live."""
        due = min(remaining * self.lifetime_fraction, remaining - self.lead)
        due = max(due, remaining * self.floor_fraction)
        return max(self.min_delay, self._jittered(due, sample))

    def retry_delay(self, failures: int, remaining: float | None, sample: float) -> float:
        """Seconds until the retry after `failures` (>= 1) failed refreshes in a row.

        With a still-valid snapshot the retry comes no later than halfway to its expiry, so the
        attempts keep coming as expiry nears instead of sleeping past it.
        """
        exponent = min(max(failures - 1, 0), 64)  # bounded: no float overflow after long outages
        backoff = min(self.backoff_max, self.backoff_initial * self.backoff_factor**exponent)
        delay = self._jittered(backoff, sample)
        if remaining is not None and remaining > 0:
            delay = min(delay, remaining / 2)
        return max(self.min_delay, delay)


class CredentialStore:
    """Holds the current snapshot and refreshes it in the background (see the module docstring)."""

    def __init__(
        self,
        provider: CredentialProvider,
        *,
        clock: Callable[[], float] = time.time,
        refresh_policy: RefreshPolicy = RefreshPolicy(),
    ) -> None:
        self._provider = provider
        self._clock = clock
        self._policy = refresh_policy
        self._current: Credentials | None = None
        self._failures_in_row = 0
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self.refresh_success = 0
        self.refresh_failure = 0
        self.last_error: str | None = None
        self.on_refresh: Callable[[str], None] | None = None

    # --- construction ---
    @classmethod
    def from_botocore(
        cls,
        *,
        profile: str | None = None,
        role_arn: str | None = None,
        role_session_name: str = "sigv4proxy",
        external_id: str | None = None,
        duration_seconds: int = 3600,
        region: str | None = None,
        sts_endpoint_url: str | None = None,
        in_child_process: bool = False,
        **kw: Any,
    ) -> CredentialStore:
        """A store over botocore's default chain, with an optional AssumeRole on top.

        `in_child_process`: each fetch in a child interpreter, the first one started now
        (`serve`: the worker never imports botocore). `kw` goes to the constructor (`clock`,
        `refresh_policy`).
        """
        settings = ChainSettings(
            profile=profile,
            region=region,
            role_arn=role_arn,
            role_session_name=role_session_name,
            external_id=external_id,
            duration_seconds=duration_seconds,
            sts_endpoint_url=sts_endpoint_url,
        )
        inner = settings.provider()  # checks the settings; imports no botocore
        if not in_child_process:
            return cls(inner, **kw)
        provider = ChildProcessProvider(settings)
        provider.begin()
        return cls(provider, **kw)

    @classmethod
    def from_config(cls, config: ProxyConfig, *, in_child_process: bool = False) -> CredentialStore:
        """The store `serve` and `call` use: the chain with the config's profile and AssumeRole."""
        return cls.from_botocore(
            profile=config.profile,
            role_arn=config.role_arn,
            role_session_name=config.role_session_name,
            external_id=config.external_id,
            duration_seconds=config.role_duration,
            region=config.region,
            in_child_process=in_child_process,
        )

    @classmethod
    def static(cls, access_key: str, secret_key: str, token: str | None = None) -> CredentialStore:
        """Fixed credentials: usable at once (no start() needed) and never refreshed."""
        try:
            creds = checked_credentials(access_key, secret_key, token, None)
        except CredentialFetchError as exc:
            raise ValueError(str(exc)) from None
        store = cls(StaticProvider(creds))
        store._current = creds
        return store

    # --- the hot path ---
    def snapshot(self) -> Credentials:
        """The current credentials; raises CredentialsUnavailable when none or expired."""
        creds = self._current
        if creds is None:
            raise CredentialsUnavailable("no credentials")
        if creds.expiry is not None and creds.expiry <= self._clock():
            raise CredentialsUnavailable("credentials expired")
        return creds

    # --- state for health, readiness and metrics ---
    def ready(self) -> tuple[bool, str]:
        creds = self._current
        if creds is None:
            if self.last_error is None:
                return False, "credentials not loaded yet"
            return False, f"no credentials: {self.last_error}"
        if creds.expiry is not None and creds.expiry <= self._clock():
            reason = "credentials expired"
            return False, f"{reason}: {self.last_error}" if self.last_error else reason
        return True, ""

    @property
    def expiry(self) -> float | None:
        creds = self._current
        return creds.expiry if creds is not None else None

    def __repr__(self) -> str:  # state only: never a key
        return (
            f"CredentialStore(provider={self._provider!r}, loaded={self._current is not None}, "
            f"expiry={self.expiry!r}, refresh_success={self.refresh_success}, "
            f"refresh_failure={self.refresh_failure})"
        )

    # --- lifecycle ---
    async def start(self) -> None:
        """First fetch (in the worker thread), then the background refresh task.

        A failed first fetch does not raise: the store reports not-ready and keeps retrying.
        """
        if self._task is not None or self._closed:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sigv4proxy-credentials"
        )
        await self._refresh_once()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sigv4proxy-credentials-refresh")

    async def aclose(self) -> None:
        """Stops the background task at once; a fetch in flight finishes in its thread, unused."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self._provider, "close", None)  # a child process still fetching
        if close is not None:
            close()

    # --- refreshing ---
    def _next_delay(self) -> float | None:
        sample = random.uniform(-1.0, 1.0)
        creds = self._current
        remaining = None
        if creds is not None and creds.expiry is not None:
            remaining = creds.expiry - self._clock()
        if self._failures_in_row:
            return self._policy.retry_delay(self._failures_in_row, remaining, sample)
        if remaining is None:
            return None  # never expires: nothing to refresh
        return self._policy.refresh_delay(remaining, sample)

    async def _run(self) -> None:
        while True:
            delay = self._next_delay()
            if delay is None:
                return
            await asyncio.sleep(delay)
            await self._refresh_once()

    async def _refresh_once(self) -> bool:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            creds = await loop.run_in_executor(self._executor, self._provider.fetch)
            if not isinstance(creds, Credentials):
                raise CredentialFetchError("provider returned no credentials")
            if creds.expiry is not None and creds.expiry <= self._clock():
                raise CredentialFetchError("fetched credentials are already expired")
        except Exception as exc:  # noqa: BLE001 - any failure is counted, logged safely, retried
            self._record_failure(exc, time.monotonic() - started)
            return False
        self._record_success(creds, time.monotonic() - started)
        return True

    def _record_success(self, creds: Credentials, took: float) -> None:
        self._current = creds
        self._failures_in_row = 0
        self.last_error = None
        self.refresh_success += 1
        hint = key_hint(creds.access_key)
        if creds.expiry is None:
            log.info("credentials refreshed: key %s, no expiry (%.2fs)", hint, took)
        else:
            left = creds.expiry - self._clock()
            log.info("credentials refreshed: key %s, expire in %.0fs (%.2fs)", hint, left, took)
        self._notify("success")

    def _record_failure(self, exc: Exception, took: float) -> None:
        # Only our own reasons are shown verbatim: other messages may quote a response body.
        if isinstance(exc, CredentialFetchError):
            reason = str(exc)[:200]
        else:
            reason = f"fetch failed ({type(exc).__name__})"
        self.last_error = reason
        self._failures_in_row += 1
        self.refresh_failure += 1
        ok, _ = self.ready()
        log.warning(
            "credential refresh failed (%d in a row, %.2fs): %s; %s",
            self._failures_in_row,
            took,
            reason,
            "keeping the last good ones" if ok else "none valid: failing closed",
        )
        self._notify("failure")

    def _notify(self, outcome: str) -> None:
        callback = self.on_refresh
        if callback is None:
            return
        try:
            callback(outcome)
        except Exception:  # noqa: BLE001 - a metrics hook must not stop the refresh loop
            log.exception("on_refresh callback failed")
