"""A local container-credentials endpoint (the ECS task role / EKS Pod Identity protocol).

Owns: an HTTP/1.1 server on 127.0.0.1 (ephemeral port) that answers GET requests with short-lived,
rotating keys in the container credentials JSON shape, checks the `Authorization` header against
its token, counts fetches, and has switches for failure modes: slow, 500, connection refused,
garbage body, incomplete JSON, already-expired keys. Must never: listen beyond loopback, or run
past its test (use `async with` / `start()`+`stop()`, or `ThreadedCredsServer` for sync code).

Point botocore at it with `server.env()` (or `apply_env(monkeypatch)`), after
`isolate_aws_env(monkeypatch, tmp_path)` so that no other credential source can answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib
import secrets
import string
import threading
import time
from dataclasses import dataclass
from typing import Any

# Modes: what the next fetches get.
OK = "ok"
ERROR = "error"  # HTTP 500
GARBAGE = "garbage"  # 200 with a body that is not JSON
INCOMPLETE = "incomplete"  # 200 with JSON that lacks the secret key
EXPIRED = "expired"  # 200 with keys whose Expiration is already past
MODES = (OK, ERROR, GARBAGE, INCOMPLETE, EXPIRED)

PATH = "/v2/credentials/sigv4proxy-test"
_ALNUM = string.ascii_uppercase + string.digits

# Environment that could make botocore find credentials somewhere other than the test's endpoint.
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS",
    "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
)


def isolate_aws_env(monkeypatch: Any, tmp_path: pathlib.Path) -> None:
    """Remove every ambient credential source: env keys, shared files, IMDS, proxies."""
    for name in _AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never reach 169.254.169.254
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    access_key: str
    secret_key: str
    token: str
    expiry: float  # epoch seconds


class CredsServer:
    """The endpoint itself, on the running loop. Attributes are switches that tests set directly."""

    def __init__(self, *, lifetime: float = 10.0, token: str | None = None) -> None:
        self.lifetime = lifetime
        self.token = token if token is not None else "container-auth-" + secrets.token_hex(8)
        self.mode = OK
        # Slow mode spreads this over the response in pauses < 1 s (botocore's read timeout: 2 s).
        self.slow_seconds = 0.0
        self.fetches = 0  # every request received
        self.unauthorized = 0  # requests with a missing or wrong Authorization header
        self.issued: list[IssuedKey] = []  # keys handed out with 200 (also expired ones)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---
    async def start(self) -> "CredsServer":
        await self._listen(self.port)
        return self

    async def stop(self) -> None:
        await self.refuse()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)

    async def refuse(self) -> None:
        """Stop listening: fetches now fail with connection refused. `accept()` undoes it."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def accept(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self._listen(self.port)

    async def __aenter__(self) -> "CredsServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _listen(self, port: int) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    # --- what clients need ---
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def env(self, token_file: pathlib.Path | None = None) -> dict[str, str]:
        """The variables botocore's container provider reads (token inline, or in a file)."""
        env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": self.url}
        if token_file is None:
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = self.token
        else:
            token_file.write_text(self.token)
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(token_file)
        return env

    def apply_env(self, monkeypatch: Any, token_file: pathlib.Path | None = None) -> None:
        for name, value in self.env(token_file).items():
            monkeypatch.setenv(name, value)

    def is_issued(self, access_key: str) -> bool:
        return any(key.access_key == access_key for key in self.issued)

    # --- serving ---
    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            status, body = self._answer(head)
            await self._respond(writer, status, body)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, bytes]:
        self.fetches += 1
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.rpartition(" ")[0]
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method != "GET" or path != PATH:
            return 404, b'{"message": "not found"}'
        if headers.get("authorization") != self.token:
            self.unauthorized += 1
            return 401, b'{"message": "unauthorized"}'
        mode = self.mode
        if mode == ERROR:
            return 500, b'{"message": "internal error"}'
        if mode == GARBAGE:
            return 200, b"<html>this is not the credentials document</html>"
        key = self._new_key(expired=mode == EXPIRED)
        document = {
            "AccessKeyId": key.access_key,
            "SecretAccessKey": key.secret_key,
            "Token": key.token,
            "Expiration": _iso8601(key.expiry),
            "AccountId": "123456789012",
        }
        if mode == INCOMPLETE:
            del document["SecretAccessKey"]
        return 200, json.dumps(document).encode()

    def _new_key(self, *, expired: bool) -> IssuedKey:
        now = time.time()
        key = IssuedKey(
            access_key="ASIA" + "".join(secrets.choice(_ALNUM) for _ in range(16)),
            secret_key=secrets.token_urlsafe(30),
            token="IQoJ" + secrets.token_urlsafe(96),
            expiry=now - 60 if expired else now + self.lifetime,
        )
        self.issued.append(key)
        return key

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}
        writer.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        # Slow mode trickles the body: each pause stays well under the client's 2 s read timeout.
        pauses = max(1, int(self.slow_seconds / 0.5 + 0.999)) if self.slow_seconds > 0 else 0
        if pauses:
            step = max(1, len(body) // pauses)
            for i in range(pauses):
                await writer.drain()
                await asyncio.sleep(self.slow_seconds / pauses)
                last = i == pauses - 1
                writer.write(body[i * step:] if last else body[i * step:(i + 1) * step])
        else:
            writer.write(body)
        await writer.drain()


def _iso8601(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class ThreadedCredsServer:
    """A `CredsServer` on its own loop in a daemon thread, for sync code and sync tests.

    Use as a context manager; switches are plain attributes of `.server`; `call(coro_fn)` runs a
    server coroutine method (e.g. `refuse`) on the server's loop and waits for it (10 s at most).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.server = CredsServer(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="creds-server")

    def call(self, coro_fn: Any, *args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result(timeout=10)

    def __enter__(self) -> CredsServer:
        self._thread.start()
        self.call(self.server.start)
        return self.server

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.stop)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
