"""What the simulated Lattice service does with one request, independent of HTTP/1.1 or HTTP/2.

Owns: authenticating the request head as soon as it arrives (SigV4 needs no body: Lattice only
accepts UNSIGNED-PAYLOAD), authorizing it against the auth policy, hashing the body as it streams
in, choosing the answer (Lattice-style 403 JSON error, or a target-like 200 JSON echo, or a test
hook's streamed body), and writing the access-log record.

Test hooks (request headers, honoured only after successful auth and authorization):
  x-sim-response-bytes: N  stream N deterministic bytes (byte i is i % 256); their sha256 is in
                           the response header x-sim-body-sha256
  x-sim-status: NNN        answer with this status (200-599)
  x-sim-delay-ms: N        wait N ms (0-60000) before answering
  x-sim-trailers: 1        on HTTP/2, end the response with the trailer x-sim-trailer: ok

Must never: buffer a whole request body, echo a secret, token or signature (the echoed headers are
redacted), or import the proxy's signer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from sigv4proxy.sim.accesslog import AccessLogSink, new_record
from sigv4proxy.sim.identities import Identity, IdentityStore
from sigv4proxy.sim.policy import Policy, RequestFacts, denial_message, evaluate
from sigv4proxy.sim.verify import AuthFailure, RequestView, VerifyContext, header_value, verify_request

REDACTED_HEADERS = frozenset({"authorization", "x-amz-security-token"})
PATTERN_CHUNK = bytes(range(256)) * 256  # 64 KiB; a multiple of 256 so every chunk starts at 0
MAX_SIM_RESPONSE_BYTES = 1 << 40
MAX_SIM_DELAY_MS = 60_000


@dataclass(frozen=True)
class TlsInfo:
    cipher: str
    version: str


@dataclass(frozen=True)
class RequestHead:
    protocol: str  # "HTTP/1.1" | "HTTP/2"
    method: str
    target: str  # raw path and query, as on the wire
    authority: str | None
    headers: list[tuple[str, str]]  # lowercase names, arrival order (HTTP/2: host = :authority)
    peer: tuple[str, int]
    local_port: int
    tls: TlsInfo | None = None

    @property
    def raw_path(self) -> str:
        return self.target.partition("?")[0] or "/"

    @property
    def raw_query(self) -> str:
        return self.target.partition("?")[2]


@dataclass
class ResponsePlan:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream_bytes: int | None = None  # instead of body: this many pattern bytes
    trailers: list[tuple[str, str]] | None = None

    def chunks(self, size: int = len(PATTERN_CHUNK)) -> Iterator[bytes]:
        if self.stream_bytes is None:
            if self.body:
                yield self.body
            return
        remaining = self.stream_bytes
        while remaining > 0:
            n = min(size, remaining, len(PATTERN_CHUNK))
            yield PATTERN_CHUNK[:n]
            remaining -= n


@lru_cache(maxsize=32)
def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(n, len(PATTERN_CHUNK))
    for _ in range(full):
        digest.update(PATTERN_CHUNK)
    digest.update(PATTERN_CHUNK[:rest])
    return digest.hexdigest()


def _json_response(status: int, payload: dict[str, Any], extra: list[tuple[str, str]]) -> ResponsePlan:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return ResponsePlan(status, [("content-type", "application/json"), *extra], body)


class HookError(ValueError):
    pass


def _int_hook(head: RequestHead, name: str, low: int, high: int) -> int | None:
    raw = header_value(head.headers, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise HookError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise HookError(f"{name} must be between {low} and {high}")
    return value


@dataclass
class SimApp:
    """The simulated service: configuration that is fixed for the server's life."""

    identities: IdentityStore
    policy: Policy | None
    service_arn: str
    service_network_arn: str
    region: str
    service: str
    require_auth: bool
    clock: Callable[[], float]
    log: AccessLogSink
    double_encode_path: bool = True  # how the canonical URI is built (`--uri-path-escaping`)
    source_vpc_arn: str = "arn:aws:ec2:us-west-2:111122223333:vpc/vpc-0sim0000000000000"

    def begin(self, head: RequestHead) -> Exchange:
        return Exchange(self, head)


@dataclass
class Exchange:
    """One request: authenticated and authorized on creation, body hashed as it arrives."""

    app: SimApp
    head: RequestHead
    started: float = field(default_factory=time.time)
    identity: Identity | None = None
    failure: AuthFailure | None = None
    signed_headers: tuple[str, ...] = ()
    denied_reason: str = "-"
    body_hash: Any = field(default_factory=hashlib.sha256)
    body_length: int = 0
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self._authenticate()

    def _authenticate(self) -> None:
        app, head = self.app, self.head
        has_auth = header_value(head.headers, "authorization") is not None
        if has_auth or app.require_auth:
            view = RequestView(head.method, head.raw_path, head.raw_query, head.headers)
            try:
                verified = verify_request(
                    view, VerifyContext(app.identities, app.region, app.service, app.clock(), app.double_encode_path)
                )
            except AuthFailure as exc:
                self.failure, self.denied_reason = exc, exc.exception
                return
            self.identity, self.signed_headers = verified.identity, verified.auth.signed_headers
        decision = evaluate(app.policy, self.identity, self.facts())
        if not decision.allowed:
            resource = app.service_arn + head.raw_path
            principal = self.identity.principal if self.identity else None
            self.failure = AuthFailure("AccessDeniedException", denial_message(decision, principal, resource))
            self.denied_reason = f"{decision.reason}:{decision.statement}" if decision.statement else decision.reason

    def facts(self) -> RequestFacts:
        head = self.head
        query = []
        for piece in head.raw_query.split("&"):
            if piece:
                k, _, v = piece.partition("=")
                query.append((unquote(k), unquote(v)))
        return RequestFacts(
            method=head.method,
            path=head.raw_path,
            headers=head.headers,
            query=query,
            port=head.local_port,
            service_arn=self.app.service_arn,
            service_network_arn=self.app.service_network_arn,
            source_ip=head.peer[0],
            source_vpc=self.app.source_vpc_arn.rpartition("/")[2],
            source_vpc_owner_account=self.app.source_vpc_arn.split(":")[4],
        )

    def feed(self, data: bytes) -> None:
        self.body_hash.update(data)
        self.body_length += len(data)

    async def respond(self) -> ResponsePlan:
        """The answer, once the whole body has arrived (may sleep for x-sim-delay-ms)."""
        common = [("x-amzn-requestid", self.request_id)]
        if self.failure is not None:
            f = self.failure
            return _json_response(
                f.status, {"Message": f"{f.exception}: {f.message}"}, [("x-amzn-errortype", f.exception), *common]
            )
        try:
            n_bytes = _int_hook(self.head, "x-sim-response-bytes", 0, MAX_SIM_RESPONSE_BYTES)
            status = _int_hook(self.head, "x-sim-status", 200, 599) or 200
            delay_ms = _int_hook(self.head, "x-sim-delay-ms", 0, MAX_SIM_DELAY_MS)
        except HookError as exc:
            return _json_response(
                400, {"Message": f"ValidationException: {exc}"}, [("x-amzn-errortype", "ValidationException"), *common]
            )
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        headers = [*common, *self.lattice_headers()]
        trailers = [("x-sim-trailer", "ok")] if header_value(self.head.headers, "x-sim-trailers") == "1" else None
        if n_bytes is not None:
            digest = await asyncio.to_thread(pattern_sha256, n_bytes)  # 1 GiB takes seconds
            headers += [("content-type", "application/octet-stream"), ("x-sim-body-sha256", digest)]
            return ResponsePlan(status, headers, stream_bytes=n_bytes, trailers=trailers)
        plan = _json_response(status, self.echo(), headers)
        plan.trailers = trailers
        return plan

    def lattice_headers(self) -> list[tuple[str, str]]:
        ident = self.identity
        parts = [f"Principal={ident.principal}" if ident else "Principal=anonymous"]
        if ident and ident.org_id:
            parts.append(f"PrincipalOrgID={ident.org_id}")
        if ident and ident.session_name:
            parts.append(f"SessionName={ident.session_name}")
        return [
            ("x-amzn-lattice-identity", "; ".join(parts)),
            ("x-amzn-lattice-network", f"SourceVpcArn={self.app.source_vpc_arn}"),
            (
                "x-amzn-lattice-target",
                f"ServiceArn={self.app.service_arn}; ServiceNetworkArn={self.app.service_network_arn}",
            ),
        ]

    def echo(self) -> dict[str, Any]:
        head = self.head
        return {
            "principal": self.identity.principal if self.identity else None,
            "signed_headers": list(self.signed_headers),
            "protocol": head.protocol,
            "method": head.method,
            "path": head.raw_path,
            "query": head.raw_query,
            "authority": head.authority,
            "headers": [[n, "REDACTED" if n in REDACTED_HEADERS else v] for n, v in head.headers],
            "body_sha256": self.body_hash.hexdigest(),
            "body_length": self.body_length,
        }

    def finish(
        self, status: int, bytes_sent: int, failure_reason: str | None = None, first_byte_at: float | None = None
    ) -> None:
        """Writes the access-log record (explicit fields only: never a header dump)."""
        head, ident, now = self.head, self.identity, time.time()
        rec = new_record()
        rec.update(
            {
                "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "serviceNetworkArn": self.app.service_network_arn,
                "serviceArn": self.app.service_arn,
                "sourceVpcArn": self.app.source_vpc_arn,
                "sourceVpcId": self.app.source_vpc_arn.rpartition("/")[2],
                "sourceIpPort": f"{head.peer[0]}:{head.peer[1]}",
                "hostHeader": head.authority or "-",
                "requestMethod": head.method,
                "requestPath": head.raw_path,
                "protocol": head.protocol,
                "responseCode": status,
                "bytesReceived": self.body_length,
                "bytesSent": bytes_sent,
                "duration": int((now - self.started) * 1000),
                "requestToTargetDuration": int(((first_byte_at or now) - self.started) * 1000),
                "userAgent": header_value(head.headers, "user-agent") or "-",
                "callerPrincipal": ident.principal if ident else "-",
                "callerPrincipalTags": dict(ident.principal_tags) if ident and ident.principal_tags else "-",
                "authDeniedReason": self.denied_reason,
                "failureReason": failure_reason or "-",
            }
        )
        if head.tls is not None:
            rec.update({"sslCipher": head.tls.cipher, "tlsVersion": head.tls.version, "listenerType": "HTTPS"})
        else:
            rec["listenerType"] = "HTTP"
        self.app.log.emit(rec)
