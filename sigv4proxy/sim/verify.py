"""SigV4 verification for the simulator, written from the spec (never from the proxy's signer).

Owns: turning a request as it arrived on the wire (method, raw path, raw query, headers in arrival
order) into a verdict: which identity signed it, or the Lattice-style exception that rejects it.
Canonicalization follows the non-S3 rules (dot and empty path segments removed, the
already-encoded path encoded once more, query decoded then re-encoded, headers trimmed/collapsed);
whether the path is encoded once more is a setting (`VerifyContext.double_encode_path`), since
Lattice's own documentation does not settle it: single encoding signs the wire path as it arrived.

Must never: import `sigv4proxy.aws.signing` (this is the proxy's independent oracle), read the clock
itself (callers pass `now`), or put a secret, a session token or a signature in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from calendar import timegm
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import gmtime, strftime, strptime
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

from sigv4proxy.sim.identities import Identity, IdentityStore

if TYPE_CHECKING:
    from sigv4proxy.sim.verify_v4a import V4AAuthorization

SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
SIGV4A_ALGORITHM = "AWS4-ECDSA-P256-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_SKEW_SECONDS = 300
_ENCODING = ("utf-8", "surrogateescape")  # byte-exact round trip of whatever arrived
_WS_RUN = re.compile(r"\s+")
_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")

Headers = Sequence[tuple[str, str]]  # (lowercase name, value) in arrival order


class AuthFailure(Exception):
    """A rejected request: `exception` is the Lattice error type, `message` safe to show."""

    status = 403

    def __init__(self, exception: str, message: str) -> None:
        super().__init__(f"{exception}: {message}")
        self.exception = exception
        self.message = message


def incomplete(msg: str) -> AuthFailure:
    return AuthFailure("IncompleteSignatureException", msg)


def invalid(msg: str) -> AuthFailure:
    return AuthFailure("InvalidSignatureException", msg)


MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation "
    "for details."
)
# Lattice does not document its answer for an unknown key or a bad token; AWS JSON-protocol
# front ends answer both with UnrecognizedClientException and this text, so the simulator does too.
BAD_TOKEN = "The security token included in the request is invalid."


@dataclass(frozen=True)
class RequestView:
    """The parts of a request that SigV4 covers, exactly as received."""

    method: str
    raw_path: str
    raw_query: str
    headers: Headers


@dataclass(frozen=True)
class AuthorizationHeader:
    algorithm: str
    access_key_id: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signed_headers_raw: str
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{self.terminator}"

    def __repr__(self) -> str:  # the signature never shows up in a repr
        return f"AuthorizationHeader({self.algorithm}, key={self.access_key_id}, scope={self.scope})"


@dataclass(frozen=True)
class Verified:
    identity: Identity
    auth: AuthorizationHeader | V4AAuthorization


# --- canonicalization (pure) ---


def canonical_uri(raw_path: str, double_encode: bool = True) -> str:
    """Remove dot and empty segments, then URI-encode the (already encoded) path once more, or
    with `double_encode=False` keep it as it arrived (it is already encoded once)."""
    segments: list[str] = []
    for seg in raw_path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    path = "/" + "/".join(segments)
    if segments and raw_path.endswith("/"):
        path += "/"
    return quote(path.encode(*_ENCODING), safe="/~") if double_encode else path


def canonical_query(raw_query: str) -> str:
    pairs: list[tuple[str, str]] = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        pairs.append((_reencode(key), _reencode(value)))
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def _reencode(component: str) -> str:
    raw = unquote_to_bytes(component.encode(*_ENCODING))
    return quote_from_bytes(raw, safe="-_.~")


def header_value(headers: Headers, name: str) -> str | None:
    """All values of `name` joined with ',' in arrival order, each trimmed and collapsed."""
    values = [_WS_RUN.sub(" ", v.strip()) for n, v in headers if n == name]
    return ",".join(values) if values else None


def canonical_request(
    req: RequestView,
    signed_headers: Sequence[str],
    signed_headers_raw: str,
    payload_hash: str,
    double_encode: bool = True,
) -> str:
    lines = []
    for name in signed_headers:
        value = header_value(req.headers, name)
        if value is None:
            raise incomplete(f"'{name}' is named as a SignedHeader, but it does not exist in the HTTP request.")
        lines.append(f"{name}:{value}\n")
    return "\n".join(
        [
            req.method,
            canonical_uri(req.raw_path, double_encode),
            canonical_query(req.raw_query),
            "".join(lines),
            signed_headers_raw,
            payload_hash,
        ]
    )


def string_to_sign(amz_date: str, scope: str, creq: str) -> str:
    digest = hashlib.sha256(creq.encode(*_ENCODING)).hexdigest()
    return f"{SIGV4_ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def compute_signature(secret: str, auth: AuthorizationHeader, amz_date: str, creq: str) -> str:
    key = signing_key(secret, auth.date, auth.region, auth.service)
    return hmac.new(key, string_to_sign(amz_date, auth.scope, creq).encode(), hashlib.sha256).hexdigest()


# --- the Authorization header ---


def parse_authorization(value: str) -> AuthorizationHeader:
    algorithm, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, val = part.strip().partition("=")
        if eq:
            params[key] = val
    for required in ("Credential", "SignedHeaders", "Signature"):
        if required not in params:
            raise incomplete(f"Authorization header requires '{required}' parameter.")
    cred = params["Credential"].split("/")
    if len(cred) != 5 or not all(cred):
        raise incomplete(
            "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term."
        )
    signed = params["SignedHeaders"]
    names = tuple(signed.split(";"))
    if not all(names) or any(n != n.lower() for n in names):
        raise incomplete("SignedHeaders must be a ';'-separated list of lowercase header names.")
    if not re.fullmatch(r"[0-9a-f]{64}", params["Signature"]):
        raise incomplete("Signature must be 64 lowercase hex characters.")
    return AuthorizationHeader(
        algorithm, cred[0], cred[1], cred[2], cred[3], cred[4], names, signed, params["Signature"]
    )


def check_date_and_host(req: RequestView, auth) -> str:
    """X-Amz-Date present and well formed, and `host` signed (SigV4 and SigV4A). Returns the date."""
    amz_date = header_value(req.headers, "x-amz-date")
    if amz_date is None:
        raise incomplete("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")
    if not _AMZ_DATE.match(amz_date):
        raise incomplete("X-Amz-Date must be in the ISO8601 basic format yyyyMMdd'T'HHmmss'Z'.")
    if "host" not in auth.signed_headers:
        raise incomplete("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    return amz_date


def check_scope(auth, amz_date: str, ctx: VerifyContext) -> None:
    """The credential scope's terminator, date and service (SigV4 and SigV4A)."""
    if auth.terminator != "aws4_request":
        raise invalid("Credential should be scoped with a valid terminator: 'aws4_request'.")
    if auth.date != amz_date[:8]:
        raise invalid(
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{auth.date}'"
            f" != '{amz_date[:8]}'."
        )
    if auth.service != ctx.service:
        raise invalid(f"Credential should be scoped to correct service: '{ctx.service}'.")


def check_time_payload_and_key(req: RequestView, ctx: VerifyContext, amz_date: str, access_key_id: str):
    """The checks SigV4 and SigV4A share after the scope: clock skew, UNSIGNED-PAYLOAD, a known key
    and its session token. Returns the identity."""
    signed_at = _amz_epoch(amz_date)
    if signed_at < ctx.now - MAX_SKEW_SECONDS:
        raise invalid(
            f"Signature expired: {amz_date} is now earlier than {_fmt(ctx.now - MAX_SKEW_SECONDS)} ({_fmt(ctx.now)} -"
            f" 5 min.)"
        )
    if signed_at > ctx.now + MAX_SKEW_SECONDS:
        raise invalid(
            f"Signature not yet current: {amz_date} is still later than {_fmt(ctx.now + MAX_SKEW_SECONDS)} "
            f"({_fmt(ctx.now)} + 5 min.)"
        )
    payload_hash = header_value(req.headers, "x-amz-content-sha256")
    if payload_hash is None:
        raise incomplete("Missing required header: x-amz-content-sha256 (use UNSIGNED-PAYLOAD).")
    if payload_hash != UNSIGNED_PAYLOAD:
        raise invalid("Signed payloads are not supported")
    identity = ctx.identities.get(access_key_id)
    if identity is None:
        raise AuthFailure("UnrecognizedClientException", BAD_TOKEN)
    if not identity.token_matches(header_value(req.headers, "x-amz-security-token")):
        raise AuthFailure("UnrecognizedClientException", BAD_TOKEN)
    return identity


def _amz_epoch(amz_date: str) -> int:
    return timegm(strptime(amz_date, "%Y%m%dT%H%M%SZ"))


def _fmt(epoch: float) -> str:
    return strftime("%Y%m%dT%H%M%SZ", gmtime(epoch))


# --- verification ---


@dataclass(frozen=True)
class VerifyContext:
    identities: IdentityStore
    region: str
    service: str
    now: float
    double_encode_path: bool = True  # False: the path signs as it arrived (single encoding)


def verify_sigv4(req: RequestView, auth_value: str, ctx: VerifyContext) -> Verified:
    auth = parse_authorization(auth_value)
    amz_date = check_date_and_host(req, auth)
    check_scope(auth, amz_date, ctx)
    if auth.region != ctx.region:
        raise invalid(f"Credential should be scoped to a valid region, not '{auth.region}'.")
    identity = check_time_payload_and_key(req, ctx, amz_date, auth.access_key_id)
    creq = canonical_request(
        req, auth.signed_headers, auth.signed_headers_raw, UNSIGNED_PAYLOAD, ctx.double_encode_path
    )
    expected = compute_signature(identity.secret_access_key, auth, amz_date, creq)
    if not hmac.compare_digest(expected, auth.signature):
        raise invalid(MISMATCH)
    return Verified(identity, auth)


def _verify_sigv4a(req: RequestView, auth_value: str, ctx: VerifyContext) -> Verified:
    # Imported here: sim.verify_v4a builds on this module (canonicalisation, errors).
    from sigv4proxy.sim.verify_v4a import verify_sigv4a

    return verify_sigv4a(req, auth_value, ctx)


# Extension point: one verifier per algorithm named at the start of the Authorization header.
VERIFIERS: dict[str, Callable[[RequestView, str, VerifyContext], Verified]] = {
    SIGV4_ALGORITHM: verify_sigv4,
    SIGV4A_ALGORITHM: _verify_sigv4a,
}


def verify_request(req: RequestView, ctx: VerifyContext) -> Verified:
    """Verify `req`'s Authorization header; raises AuthFailure with the Lattice exception."""
    auth_value = header_value(req.headers, "authorization")
    if auth_value is None:
        raise AuthFailure("AccessDeniedException", "Missing Authentication Token: the request is not signed.")
    algorithm = auth_value.strip().partition(" ")[0]
    verifier = VERIFIERS.get(algorithm)
    if verifier is None:
        raise incomplete("Unsupported AWS 'algorithm'; expected AWS4-HMAC-SHA256 or AWS4-ECDSA-P256-SHA256.")
    return verifier(req, auth_value, ctx)
