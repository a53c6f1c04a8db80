"""The credential store: the one owner of AWS credentials and their refresh.

Owns: resolving credentials (botocore's default chain, optionally AssumeRole on top), the refresh
schedule (ahead of expiry, jittered, exponential backoff on failure) and the current snapshot that
the signer reads with no await and no lock.
Must never: call botocore on the event loop (its fetches do blocking network I/O, so they run in
the store's own worker thread), hand out an expired snapshot (it fails closed with
`CredentialsUnavailable`), or put a secret key, session token or signature in a log, a repr or an
error message (logs carry an access key id prefix at most).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from sigv4proxy.errors import CredentialsUnavailable
from sigv4proxy.signing import Credentials

log = logging.getLogger(__name__)

# Third-party loggers that print header values (x-amz-security-token) or credential payloads at
# debug level.
THIRD_PARTY_LOGGERS: tuple[str, ...] = ("botocore", "boto3", "urllib3", "hpack", "h2")

# What may go into an HTTP header as an access key id or a session token: visible ASCII, no space.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def quiet_third_party_loggers(level: int = logging.WARNING) -> None:
    """Keep chatty third-party loggers at `level` (WARNING) or above, whatever our own level is."""
    names = set(THIRD_PARTY_LOGGERS)
    # Children that were given their own level explicitly would otherwise ignore their parent's.
    for name in list(logging.root.manager.loggerDict):
        if any(name.startswith(prefix + ".") for prefix in THIRD_PARTY_LOGGERS):
            names.add(name)
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)


def key_hint(access_key: str) -> str:
    """The most of an access key id that may be logged."""
    return access_key[:8] + "…"


class CredentialFetchError(Exception):
    """A fetch failed; the message is a short reason that is safe to log and to show in /readyz."""


class CredentialProvider(Protocol):
    """Obtains a fresh snapshot. Called in a worker thread, one call at a time; may block."""

    def fetch(self) -> Credentials: ...


def checked_credentials(
    access_key: Any, secret_key: Any, token: Any, expiry: float | None
) -> Credentials:
    """Build a snapshot from untrusted parts, rejecting anything unusable as a header value."""
    if not isinstance(access_key, str) or not _HEADER_SAFE.fullmatch(access_key):
        raise CredentialFetchError("malformed access key id")
    if not isinstance(secret_key, str) or not secret_key:
        raise CredentialFetchError("malformed secret access key")
    if token is not None and (not isinstance(token, str) or not _HEADER_SAFE.fullmatch(token)):
        raise CredentialFetchError("malformed session token")
    return Credentials(access_key, secret_key, token or None, expiry)


@dataclass(frozen=True, slots=True)
class StaticProvider:
    """Fixed credentials that never expire (flags, tests)."""

    credentials: Credentials

    def fetch(self) -> Credentials:
        return self.credentials


@contextlib.contextmanager
def _safe_reasons(stage: str) -> Iterator[None]:
    """Turns botocore's errors into CredentialFetchError with a reason that is safe to show:
    botocore's own messages may quote a response body, so only types and error codes pass."""
    import botocore.exceptions

    try:
        yield
    except CredentialFetchError:
        raise
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "unknown")
        raise CredentialFetchError(f"{stage}: {code}"[:120]) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise CredentialFetchError(f"{stage} ({type(exc).__name__})") from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        reason = f"{stage}: malformed credentials ({type(exc).__name__})"
        raise CredentialFetchError(reason) from None


class BotocoreProvider:
    """botocore's default chain (environment, shared config and profiles, IRSA web identity,
    ECS/EKS Pod Identity container endpoint, IMDSv2), optionally with an AssumeRole on top.

    Every fetch resolves the chain afresh with a new botocore Session: a cached botocore object
    would hand back the same keys until its own 15-minute refresh window, so our schedule could
    not rotate short-lived credentials.
    """

    def __init__(
        self,
        *,
        profile: str | None = None,
        region: str | None = None,
        role_arn: str | None = None,
        role_session_name: str = "sigv4proxy",
        external_id: str | None = None,
        duration_seconds: int = 3600,
        sts_endpoint_url: str | None = None,
    ) -> None:
        if not 900 <= duration_seconds <= 43200:
            raise ValueError("duration_seconds must be between 900 and 43200")
        self.profile = profile
        self.region = region
        self.role_arn = role_arn
        self.role_session_name = role_session_name
        self._external_id = external_id  # private: a confused-deputy guard, kept out of reprs
        self.duration_seconds = duration_seconds
        self.sts_endpoint_url = sts_endpoint_url  # None: botocore applies AWS_ENDPOINT_URL_STS
        self._loader: Any = None  # shared by every fetch's Session: models are parsed once

    def __repr__(self) -> str:
        return f"BotocoreProvider(profile={self.profile!r}, role_arn={self.role_arn!r})"

    def fetch(self) -> Credentials:
        with _safe_reasons("credential chain failed"):
            session = self._new_session()
            base = self._resolve_chain(session)
        if self.role_arn is None:
            return base
        with _safe_reasons("AssumeRole failed"):
            return self._assume_role(session, base)

    def _new_session(self) -> Any:
        import botocore.loaders
        import botocore.session

        session = botocore.session.Session(profile=self.profile)
        if self._loader is None:
            self._loader = botocore.loaders.create_loader(session.get_config_variable("data_path"))
        session.register_component("data_loader", self._loader)
        return session

    def _resolve_chain(self, session: Any) -> Credentials:
        from botocore.credentials import RefreshableCredentials

        found = session.get_credentials()
        if found is None:
            raise CredentialFetchError("no credentials in the default chain")
        if isinstance(found, RefreshableCredentials):
            # These were fetched just now and we own the schedule: stop botocore from refetching
            # inside get_frozen_credentials() because they fall in its 15/10-minute windows.
            found._advisory_refresh_timeout = 0
            found._mandatory_refresh_timeout = 0
            if found._expiry_time is not None and found._expiry_time.timestamp() <= time.time():
                raise CredentialFetchError("fetched credentials are already expired")
        try:
            frozen = found.get_frozen_credentials()
        except RuntimeError:  # botocore: "refreshed credentials are still expired"
            raise CredentialFetchError("fetched credentials are already expired") from None
        expiry_time = getattr(found, "_expiry_time", None)  # botocore has no public accessor
        expiry = expiry_time.timestamp() if expiry_time is not None else None
        return checked_credentials(frozen.access_key, frozen.secret_key, frozen.token, expiry)

    def _assume_role(self, session: Any, base: Credentials) -> Credentials:
        import botocore.config

        region = self.region or session.get_config_variable("region") or "us-east-1"
        client = session.create_client(
            "sts", region_name=region, endpoint_url=self.sts_endpoint_url,
            aws_access_key_id=base.access_key, aws_secret_access_key=base.secret_key,
            aws_session_token=base.token,
            config=botocore.config.Config(
                connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3}
            ),
        )
        params: dict[str, Any] = {
            "RoleArn": self.role_arn, "RoleSessionName": self.role_session_name,
            "DurationSeconds": self.duration_seconds,
        }
        if self._external_id is not None:
            params["ExternalId"] = self._external_id
        try:
            issued = client.assume_role(**params)["Credentials"]
        finally:
            client.close()
        return checked_credentials(issued.get("AccessKeyId"), issued.get("SecretAccessKey"),
                                   issued.get("SessionToken"), issued["Expiration"].timestamp())


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
        **kw: Any,
    ) -> "CredentialStore":
        """A store over botocore's default chain, with an optional AssumeRole on top.

        `kw` goes to the constructor (`clock`, `refresh_policy`).
        """
        provider = BotocoreProvider(
            profile=profile, region=region, role_arn=role_arn, role_session_name=role_session_name,
            external_id=external_id, duration_seconds=duration_seconds,
            sts_endpoint_url=sts_endpoint_url,
        )
        return cls(provider, **kw)

    @classmethod
    def static(
        cls, access_key: str, secret_key: str, token: str | None = None
    ) -> "CredentialStore":
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
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="sigv4proxy-credentials-refresh"
        )

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
            "credential refresh failed (%d in a row, %.2fs): %s; %s", self._failures_in_row, took,
            reason, "keeping the last good ones" if ok else "none valid: failing closed",
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
