"""Where credentials come from: botocore's default chain (optionally AssumeRole on top) or fixed
keys, each fetch checked before anyone can sign with it; botocore's chain either in this process
or in a short-lived child interpreter (`python -m sigv4proxy.aws.credential_sources`), so that a
serving process never imports botocore.

Owns: the only calls into botocore's credential code, turning its errors into secret-free
`CredentialFetchError`s, and keeping third-party debug loggers quiet. Must never: run on the event
loop (every `fetch` is blocking; `credentials.CredentialStore` calls it in its worker thread), or
put a secret key, session token or payload in a log, a repr or an error message (the child's keys
travel only over its stdout pipe; its stderr is discarded).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from sigv4proxy.aws.signing import Credentials
from sigv4proxy.compat import botocore as botocore_compat

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


def checked_credentials(access_key: Any, secret_key: Any, token: Any, expiry: float | None) -> Credentials:
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
        found = session.get_credentials()
        if found is None:
            raise CredentialFetchError("no credentials in the default chain")
        # These were fetched just now and we own the schedule.
        botocore_compat.stop_refreshing(found)
        expiry = botocore_compat.expiry(found)
        if expiry is not None and expiry <= time.time():
            raise CredentialFetchError("fetched credentials are already expired")
        try:
            frozen = found.get_frozen_credentials()
        except RuntimeError:  # botocore: "refreshed credentials are still expired"
            raise CredentialFetchError("fetched credentials are already expired") from None
        return checked_credentials(frozen.access_key, frozen.secret_key, frozen.token, botocore_compat.expiry(found))

    def _assume_role(self, session: Any, base: Credentials) -> Credentials:
        import botocore.config

        region = self.region or session.get_config_variable("region") or "us-east-1"
        client = session.create_client(
            "sts",
            region_name=region,
            endpoint_url=self.sts_endpoint_url,
            aws_access_key_id=base.access_key,
            aws_secret_access_key=base.secret_key,
            aws_session_token=base.token,
            config=botocore.config.Config(
                connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3}
            ),
        )
        params: dict[str, Any] = {
            "RoleArn": self.role_arn,
            "RoleSessionName": self.role_session_name,
            "DurationSeconds": self.duration_seconds,
        }
        if self._external_id is not None:
            params["ExternalId"] = self._external_id
        try:
            issued = client.assume_role(**params)["Credentials"]
        finally:
            client.close()
        return checked_credentials(
            issued.get("AccessKeyId"),
            issued.get("SecretAccessKey"),
            issued.get("SessionToken"),
            issued["Expiration"].timestamp(),
        )


# --- botocore's chain in a child process ---

CHILD_TIMEOUT_S = 60.0  # botocore's own timeouts end sooner: AssumeRole 3 x (5 s + 10 s)


@dataclass(frozen=True)
class ChainSettings:
    """What `BotocoreProvider` is built from; sent to the child as JSON on its stdin."""

    profile: str | None = None
    region: str | None = None
    role_arn: str | None = None
    role_session_name: str = "sigv4proxy"
    external_id: str | None = None
    duration_seconds: int = 3600
    sts_endpoint_url: str | None = None

    def __repr__(self) -> str:  # the external id stays out of reprs, as in BotocoreProvider
        return f"ChainSettings(profile={self.profile!r}, role_arn={self.role_arn!r})"

    def provider(self) -> BotocoreProvider:
        return BotocoreProvider(**asdict(self))


class ChildProcessProvider:
    """botocore's default chain, each fetch in a fresh child interpreter with this process's
    environment: a worker that never imports botocore holds less memory, and `begin()`
    starts the first fetch before the worker imports its web stack, so the two use two cores.
    The child answers one JSON line on stdout: the keys, or a reason that is safe to show."""

    def __init__(self, settings: ChainSettings, *, timeout: float = CHILD_TIMEOUT_S) -> None:
        self.settings = settings
        self.timeout = timeout
        self._child: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"ChildProcessProvider({self.settings!r})"

    def begin(self) -> None:
        """Starts a fetch now; the next `fetch()` takes its answer."""
        if self._child is None:
            self._child = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        request = json.dumps(asdict(self.settings)).encode()
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, request)  # far below a pipe's capacity: never blocks
        finally:
            os.close(write_end)
        try:
            # -P: not the working directory's `sigv4proxy` (a source checkout) but this one
            return subprocess.Popen(
                [sys.executable, "-P", "-m", "sigv4proxy.aws.credential_sources"],
                stdin=read_end,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(read_end)

    def fetch(self) -> Credentials:
        child = self._child = self._child or self._spawn()
        try:
            out, _ = child.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise CredentialFetchError(f"credential chain timed out after {self.timeout:.0f}s") from None
        finally:
            self._child = None
        try:
            answer = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError, UnicodeDecodeError):
            raise CredentialFetchError(f"credential process failed (exit {child.returncode})") from None
        if "error" in answer:
            raise CredentialFetchError(str(answer["error"])[:200])
        keys = answer.get("credentials") or {}
        return checked_credentials(
            keys.get("access_key"), keys.get("secret_key"), keys.get("token"), keys.get("expiry")
        )

    def close(self) -> None:
        """Ends a fetch still running (the store is closing); its `fetch` then fails."""
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()


def _child_main() -> int:
    """The child's side: settings on stdin, one JSON line on stdout, nothing on stderr."""
    botocore_compat.keep_awscrt_unloaded()
    quiet_third_party_loggers()
    try:
        settings = ChainSettings(**json.loads(sys.stdin.read()))
        creds = settings.provider().fetch()
        answer: dict[str, Any] = {
            "credentials": {
                "access_key": creds.access_key,
                "secret_key": creds.secret_key,
                "token": creds.token,
                "expiry": creds.expiry,
            }
        }
    except CredentialFetchError as exc:
        answer = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a type only: a message may quote a response
        answer = {"error": f"credential chain failed ({type(exc).__name__})"}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
