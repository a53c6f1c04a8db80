"""SigV4 request signing: pure, sans-IO, no clock.

Owns: canonicalisation (URI, query, headers), the string to sign, the derived-key cache and the
`Authorization` header for AWS Signature Version 4 (`AWS4-HMAC-SHA256`).

Must never: import asyncio or botocore, read a clock (`now` is an argument), do I/O, log, or put a
secret key, session token, signing key or signature into a repr, an exception message or the
`SigningDetails.describe()` text. It signs an allow-list of headers, never "everything".
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from sigv4proxy.errors import BadRequest, CredentialsUnavailable

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ALGORITHM = "AWS4-HMAC-SHA256"
LATTICE_SERVICE = "vpc-lattice-svcs"

# Headers the signer itself adds; a request must not already carry them (they would go on the
# wire twice). `authorization` is the output, never an input.
_OWN_HEADERS = frozenset({"x-amz-date", "x-amz-content-sha256", "x-amz-security-token", "authorization"})
# Never signed, even if configured: hop-by-hop headers change per hop, and Lattice or the client
# stack rewrites the rest.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_NEVER_SIGNED = _HOP_BY_HOP | {"user-agent", "expect", "forwarded"}
_NEVER_SIGNED_PREFIXES = ("x-forwarded-", "x-amzn-", ":")

_KEY_CACHE_SIZE = 16

# Fast paths: inputs made only of unreserved characters (plus separators) are already canonical.
_U = r"[A-Za-z0-9\-_.~]"
_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
_PATH_CHARS = _UNRESERVED + "/"
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9\-_.~=&]*")
# Every pair is `key=value` (exactly one '='), all unreserved: sortable as plain strings.
_SIMPLE_QUERY = re.compile(rf"{_U}+={_U}*(?:&{_U}+={_U}*)*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HEADER_WS = re.compile(r"[ \t\r\n]+")

# How a request header name is treated: signed if present, added by us (must be absent), or not
# signed. Learned per raw spelling so the hot path does one dict lookup per header.
_SIGNED, _OWN, _IGNORED = 0, 1, 2
_NAME_MEMO_SIZE = 512
_LAYOUT_MEMO_SIZE = 256
_USUAL_SIGNED_HEADERS = "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
_XOR_IPAD = bytes(b ^ 0x36 for b in range(256))
_XOR_OPAD = bytes(b ^ 0x5C for b in range(256))


@dataclass(frozen=True, slots=True)
class Credentials:
    """An immutable snapshot of AWS credentials; the credential store produces these."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    expiry: float | None = None  # epoch seconds; None = never expires


@dataclass(frozen=True, slots=True)
class SigningDetails:
    """What was signed, for `--explain` and tests. Holds no secret key and no signing key.

    `canonical_request` contains the session token verbatim (it is a signed header), so it is
    kept out of the repr; print `describe()`, which redacts it.
    """

    canonical_request: str = field(repr=False)
    string_to_sign: str
    signed_headers: str
    credential_scope: str
    session_token: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """Human-readable, secret-free text: canonical request (token redacted), string to sign."""
        creq = self.canonical_request
        if self.session_token:
            creq = creq.replace(self.session_token, "<redacted session token>")
        return (
            f"Canonical request:\n{creq}\n\nString to sign:\n{self.string_to_sign}\n\n"
            f"Signed headers: {self.signed_headers}\nCredential scope: {self.credential_scope}"
        )


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 dot-segment removal that also drops empty segments (the non-S3 SigV4 rule)."""
    out: list[str] = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
        else:
            out.append(segment)
    if not out:
        return "/"
    trailing = "/" if path.endswith("/") else ""
    return "/" + "/".join(out) + trailing


def canonical_uri(raw_path: str, *, normalize: bool, double_encode: bool) -> str:
    """The canonical URI of a request path as sent on the wire (already percent-encoded).

    Default (non-S3) rule: normalise, then encode the encoded path once more (`%` -> `%25`), as
    botocore's SigV4Auth and awscrt do. Single encoding (`double_encode=False`: the S3 rule, and
    AWS's Go example for Lattice): the wire path is already encoded once and signs verbatim (as
    botocore's S3 signer and awscrt with `use_double_uri_encode=False` do).
    """
    if not raw_path.startswith("/") or "?" in raw_path or "#" in raw_path:
        raise BadRequest("request path must be origin-form (start with '/', no query)")
    path = _remove_dot_segments(raw_path) if normalize else raw_path
    if double_encode:
        return quote_from_bytes(path.encode("utf-8", "surrogateescape"), safe="/~")
    return path


def _encode_component(text: str) -> str:
    return quote_from_bytes(unquote_to_bytes(text.encode("utf-8", "surrogateescape")), safe="~")


def canonical_query(raw_query: str) -> str:
    """Canonical query: decode each key and value, re-encode (only `A-Za-z0-9-_.~` literal, `+`
    becomes `%2B`), a missing `=` means an empty value, sort by key then value.

    Empty pairs (`a=1&&b=2`, a trailing `&`) are dropped, as awscrt does. A `%` not followed by
    two hex digits is malformed: BadRequest (awscrt refuses it too) rather than a guess.
    """
    if not raw_query:
        return ""
    if _SIMPLE_QUERY.fullmatch(raw_query):
        if "&" not in raw_query:
            return raw_query
        # NUL sorts below every unreserved character, so sorting "key\0value" strings orders by
        # key, then value, exactly like sorting (key, value) pairs.
        parts = raw_query.replace("=", "\0").split("&")
        parts.sort()
        return "&".join(parts).replace("\0", "=")
    pairs: list[tuple[str, str]] = []
    if _PLAIN_QUERY.fullmatch(raw_query):
        for pair in raw_query.split("&"):
            if pair:
                key, _, value = pair.partition("=")
                pairs.append((key, value.replace("=", "%3D")))
    else:
        if "%" in raw_query and _BAD_ESCAPE.search(raw_query):
            raise BadRequest("malformed percent-encoding in the query string")
        for pair in raw_query.split("&"):
            if pair:
                key, _, value = pair.partition("=")
                pairs.append((_encode_component(key), _encode_component(value)))
    pairs.sort()
    return "&".join([f"{k}={v}" for k, v in pairs])


def _trim_value(value: str) -> str:
    """Trimall: strip, and collapse inner runs of whitespace (incl. obs-fold) to one space."""
    if "  " in value or "\t" in value or "\n" in value or "\r" in value:
        return _HEADER_WS.sub(" ", value).strip(" ")
    if value[:1] == " " or value[-1:] == " ":
        return value.strip(" ")
    return value


def _validated_extra_names(names: Iterable[str]) -> frozenset[str]:
    result = set()
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name in _NEVER_SIGNED or name.startswith(_NEVER_SIGNED_PREFIXES):
            raise ValueError(f"header {name!r} can never be signed (hop-by-hop or rewritten by Lattice/proxies)")
        if name in _OWN_HEADERS:
            continue  # already signed by the signer itself
        result.add(name)
    return frozenset(result)


class SigV4Signer:
    """Signs requests for one (service, region). Holds only config and small bounded caches."""

    algorithm = ALGORITHM

    def __init__(
        self,
        service: str,
        region: str,
        *,
        extra_signed_headers: Iterable[str] = (),
        unsigned_payload: bool | None = None,
        normalize_path: bool = True,
        double_encode_path: bool = True,
        content_sha256_header: bool = True,
    ) -> None:
        if not service or not region or "/" in service or "/" in region:
            raise ValueError("service and region must be non-empty and contain no '/'")
        is_lattice = service == LATTICE_SERVICE
        if unsigned_payload is None:
            unsigned_payload = is_lattice
        if is_lattice and not (unsigned_payload and content_sha256_header):
            raise ValueError("vpc-lattice-svcs requires x-amz-content-sha256: UNSIGNED-PAYLOAD")
        self.service = service
        self.region = region
        self.unsigned_payload = unsigned_payload
        self.normalize_path = normalize_path
        self.double_encode_path = double_encode_path
        self.content_sha256_header = content_sha256_header
        self.extra_signed_headers = _validated_extra_names(extra_signed_headers)
        # Every header name this signer signs when present (lowercase): a caller may pass only
        # the headers with these names, since all others are skipped anyway.
        self.signed_header_names = self.extra_signed_headers | {"host"}
        self._kinds: dict[str, int] = {name: _SIGNED for name in self.signed_header_names}
        self._kinds.update({name: _OWN for name in _OWN_HEADERS | self._own_header_names()})
        self._name_memo: dict[str, str] = {}  # raw name -> lowercase if signed, else ""
        self._layouts: dict[tuple[str, ...], tuple[list[str], str, list[str]]] = {}
        # A normalised path of unreserved characters only is its own canonical URI whether or
        # not it is encoded again, so single encoding keeps the same fast path.
        self._plain_path_ok = normalize_path
        self._own_extra = self._extra_own_headers()
        self._usual_shape = content_sha256_header and not self._own_extra
        self._scope_tail = self._scope_suffix()
        self._last_second: int | None = None
        self._last_dates: tuple[str, str] = ("", "")  # (x-amz-date, credential scope)
        # The headers we add before `authorization`, rebuilt only when the second, the payload
        # hash or the token changes; and the same as wire bytes for `sign_wire`.
        self._own_key: tuple[str, str, str | None] | None = None
        self._own: tuple[tuple[str, str], ...] = ()
        self._own_wire: list[tuple[bytes, bytes]] = []
        self._own_wire_for: tuple[tuple[str, str], ...] | None = None
        self._keys: dict[tuple[str, str, str], object] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(service={self.service!r}, region={self.region!r})"

    # --- hooks that SigV4A overrides ---
    def _scope_suffix(self) -> str:
        return f"/{self.region}/{self.service}/aws4_request"

    def _own_header_names(self) -> frozenset[str]:
        return frozenset()

    def _extra_own_headers(self) -> list[tuple[str, str]]:
        return []

    def _derive_key(self, creds: Credentials, datestamp: str) -> object:
        """The signing key, kept as HMAC inner/outer SHA-256 states (saves a key setup per
        request; the per-request work stays one HMAC)."""
        key = hmac.digest(("AWS4" + creds.secret_key).encode(), datestamp.encode(), "sha256")
        for part in (self.region, self.service, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        key = key.ljust(64, b"\0")
        return (hashlib.sha256(key.translate(_XOR_IPAD)), hashlib.sha256(key.translate(_XOR_OPAD)))

    def _signature(self, key: Any, string_to_sign: bytes) -> str:
        inner_state, outer_state = key
        inner = inner_state.copy()
        inner.update(string_to_sign)
        outer = outer_state.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    # --- per request ---
    def _dates(self, now: float) -> tuple[str, str]:
        second = int(now)
        if second != self._last_second:
            try:
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            except (OverflowError, OSError, ValueError) as exc:
                raise ValueError("signing time out of range") from exc
            self._last_dates = (stamp, stamp[:8] + self._scope_tail)
            self._last_second = second
        return self._last_dates

    def _key(self, creds: Credentials, datestamp: str) -> object:
        cache_key = (creds.access_key, creds.secret_key, datestamp)
        key = self._keys.get(cache_key)
        if key is None:
            key = self._derive_key(creds, datestamp)
            if len(self._keys) >= _KEY_CACHE_SIZE:
                del self._keys[next(iter(self._keys))]  # oldest first: dicts keep order
            self._keys[cache_key] = key
        return key

    def _layout(self, arrival: tuple[str, ...]) -> tuple[list[str], str, list[str]]:
        """Sorted names, the SignedHeaders value and "name:" prefixes for one set of names."""
        names = sorted(arrival)
        layout = (names, ";".join(names), [name + ":" for name in names])
        if len(self._layouts) < _LAYOUT_MEMO_SIZE:
            self._layouts[arrival] = layout
        return layout

    def _signed_name(self, name: str) -> str:
        """The lowercase name if the header is signed, "" if not; raises for our own headers."""
        lname = name.lower()
        kind = self._kinds.get(lname, _IGNORED)
        if kind == _OWN:
            raise BadRequest(f"request already carries {lname}; the proxy is the only signer")
        signed_name = lname if kind == _SIGNED else ""
        if len(self._name_memo) < _NAME_MEMO_SIZE:
            self._name_memo[name] = signed_name
        return signed_name

    def _canonicalize(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        creds: Credentials,
        now: float,
        payload_hash: str | None,
    ) -> tuple[str, str, str, str, tuple[tuple[str, str], ...]]:
        """-> (canonical request, signed header names, x-amz-date, scope, headers to add before
        `authorization`)."""
        if creds.expiry is not None and creds.expiry <= now:
            raise CredentialsUnavailable("credentials expired")
        if self.unsigned_payload:
            if payload_hash is not None and payload_hash != UNSIGNED_PAYLOAD:
                raise ValueError("a payload hash was given to an unsigned-payload signer")
            payload_hash = UNSIGNED_PAYLOAD
        elif payload_hash is None:
            payload_hash = EMPTY_SHA256
        if int(now) == self._last_second:
            amz_date, scope = self._last_dates
        else:
            amz_date, scope = self._dates(now)

        token = creds.token
        own_key = (amz_date, payload_hash, token)
        if own_key != self._own_key:
            self._own = self._own_headers(amz_date, payload_hash, token)
            self._own_key = own_key
        added = self._own

        collected: dict[str, str] = {}  # signed request headers; our own names cannot occur
        memo = self._name_memo
        for name, value in headers:
            lname = memo.get(name)
            if lname is None:
                lname = self._signed_name(name)
            if not lname:
                continue
            if " " in value or not value.isprintable():
                value = _trim_value(value)
            if lname in collected:
                if lname == "host":
                    raise BadRequest("request has more than one host header")
                collected[lname] += "," + value
            else:
                collected[lname] = value
        host = collected.get("host")
        if host is None:
            raise BadRequest("request has no host header")

        if len(collected) == 1 and token and self._usual_shape:
            # The usual Lattice request: host plus our own three, in their sorted order.
            canon_headers = (
                f"host:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\nx-amz-security-token:{token}"
            )
            signed = _USUAL_SIGNED_HEADERS
        else:
            collected.update(added)
            arrival = tuple(collected)
            layout = self._layouts.get(arrival) or self._layout(arrival)
            names, signed, prefixes = layout
            canon_headers = "\n".join(map(operator.add, prefixes, map(collected.__getitem__, names)))

        if (
            self._plain_path_ok
            and raw_path[:1] == "/"
            and raw_path.isascii()
            and not raw_path.strip(_PATH_CHARS)
            and "//" not in raw_path
            and "/." not in raw_path
        ):
            # Unreserved characters only, no empty or dot segment: already canonical.
            uri = raw_path
        else:
            uri = canonical_uri(raw_path, normalize=self.normalize_path, double_encode=self.double_encode_path)
        query = canonical_query(raw_query) if raw_query else ""
        creq = f"{method}\n{uri}\n{query}\n{canon_headers}\n\n{signed}\n{payload_hash}"
        return creq, signed, amz_date, scope, added

    def _string_to_sign(self, amz_date: str, scope: str, creq: str) -> str:
        digest = hashlib.sha256(creq.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{self.algorithm}\n{amz_date}\n{scope}\n{digest}"

    def _own_headers(self, amz_date: str, payload_hash: str, token: str | None) -> tuple[tuple[str, str], ...]:
        """x-amz-date, [x-amz-content-sha256], [x-amz-security-token] and the subclass's own."""
        added = [("x-amz-date", amz_date)]
        if self.content_sha256_header:
            added.append(("x-amz-content-sha256", payload_hash))
        if token:
            added.append(("x-amz-security-token", token))
        return (*added, *self._own_extra)

    def _authorize(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        creds: Credentials,
        now: float,
        payload_hash: str | None,
    ) -> tuple[tuple[tuple[str, str], ...], str]:
        """-> (the headers added before it, the `authorization` value)."""
        creq, signed, amz_date, scope, added = self._canonicalize(
            method, raw_path, raw_query, headers, creds, now, payload_hash
        )
        digest = hashlib.sha256(creq.encode("utf-8", "surrogateescape")).hexdigest()
        sts = f"{self.algorithm}\n{amz_date}\n{scope}\n{digest}"
        key = self._keys.get((creds.access_key, creds.secret_key, amz_date[:8]))
        if key is None:
            key = self._key(creds, amz_date[:8])
        signature = self._signature(key, sts.encode())
        return added, (
            f"{self.algorithm} Credential={creds.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        )

    def sign(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        creds: Credentials,
        now: float,
        payload_hash: str | None = None,
    ) -> list[tuple[str, str]]:
        """Return the headers to add (lowercase names): x-amz-date, x-amz-content-sha256,
        [x-amz-security-token], authorization."""
        added, authorization = self._authorize(method, raw_path, raw_query, headers, creds, now, payload_hash)
        return [*added, ("authorization", authorization)]

    def sign_wire(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        creds: Credentials,
        now: float,
        payload_hash: str | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """`sign`'s headers as the wire's bytes (ASCII: UnicodeEncodeError otherwise); those
        before `authorization` encoded once per second and token, not per request."""
        added, authorization = self._authorize(method, raw_path, raw_query, headers, creds, now, payload_hash)
        if added is not self._own_wire_for:
            self._own_wire = [(n.encode("ascii"), v.encode("ascii")) for n, v in added]
            self._own_wire_for = added
        return [*self._own_wire, (b"authorization", authorization.encode("ascii"))]

    def explain(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        creds: Credentials,
        now: float,
        payload_hash: str | None = None,
    ) -> SigningDetails:
        """What `sign` would sign, without computing a key or a signature."""
        creq, signed, amz_date, scope, _ = self._canonicalize(
            method, raw_path, raw_query, headers, creds, now, payload_hash
        )
        return SigningDetails(
            canonical_request=creq,
            string_to_sign=self._string_to_sign(amz_date, scope, creq),
            signed_headers=signed,
            credential_scope=scope,
            session_token=creds.token,
        )
