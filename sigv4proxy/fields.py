"""HTTP fields in one place: which names the proxy owns (hop-by-hop, signing), what makes a field
name or value valid (RFC 9110 §5, RFC 9113 §8.2) and the checks of an HTTP/2 request's field block
and trailers (RFC 9113 §8.1-§8.3).

Owns: the hop-by-hop set and the signing headers only the proxy may set (read by the request path
and by config checks), the field-name and field-value rules, the connection-specific names, a bounded cache of names
already found valid (shared by both directions: the HTTP/2 response checks in `upstream.h2_wire`
use it too), and `request_head` / `trailers_problem`, which split and judge a request's fields.
A problem is reported as a short fixed reason, never raised: the caller decides how the stream is
refused (see `inbound.h2server`). Must never: import anything of the proxy, put a field's name or
value in a reason, or grow a cache without bound.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 9110 §7.6.1 hop-by-hop headers, plus proxy-only ones; never forwarded as received in either
# direction. `expect: 100-continue` and `te: trailers` are passed on by the request path itself
# (the proxy takes part in both); `Trailer` is end-to-end (RFC 9110 §6.6.2) and passes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "expect",
    }
)
# The proxy is the only signer: whatever the client sent for these is dropped.
SIGNING_HEADERS = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256", "x-amz-region-set"}
)
DROP_REQUEST = HOP_BY_HOP | SIGNING_HEADERS | {"host"}
# Response fields not passed on as received: hop-by-hop, and the length the framing decides.
DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
# What --add-header may not set: all of the above, and the framing the proxy computes itself.
NOT_ADDABLE = DROP_REQUEST | {"content-length"}

# RFC 9110 §5.1: a field name is a token; RFC 9113 §8.2: lower-case only on HTTP/2.
TOKEN_NAME = re.compile(rb"[a-z0-9!#$%&'*+\-.^_`|~]+")
BAD_VALUE = re.compile(rb"[\r\n\x00]")  # RFC 9113 §8.2.1: never anywhere in a value
_EDGE_SPACE = b" \t"  # ... nor at either end of one (§8.2.1)
_CRLF_NUL = "CR, LF or NUL in a field value"
_EDGE = "whitespace around a field value"
# RFC 9113 §8.2.2 (RFC 9110 §7.6.1): never in an HTTP/2 message; `te` is allowed as "trailers" only
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
# Names already found valid and neither connection-specific nor `te` (whose value matters).
VALID_NAMES: set[bytes] = set()
VALID_NAMES_LIMIT = 4096

_PSEUDO_SLOTS = {b":method": 0, b":scheme": 1, b":authority": 2, b":path": 3}  # RFC 9113 §8.3.1
# Pseudo-header values are request-line parts: no control characters or whitespace at all.
_CONTROL_OR_SPACE = bytes(range(0x21)) + b"\x7f"
_METHOD = re.compile(rb"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")  # RFC 9110 §9.1: a token
_COMMON_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
_DEFAULT_PORT = {b"http": b":80", b"https": b":443"}


class MalformedFields(Exception):
    """A response/trailer field section breaks RFC 9113 §8.2/§8.3 (a stream error)."""


def name_problem(name: bytes, value: bytes) -> str | None:
    """Why a regular field's name (with `value`, for `te`) may not be sent on HTTP/2, or None;
    a valid name other than `te` is remembered while the cache has room."""
    if not TOKEN_NAME.fullmatch(name):
        return "upper-case field name" if TOKEN_NAME.fullmatch(name.lower()) else "invalid field name"
    if name in CONNECTION_SPECIFIC:
        return "connection-specific field"
    if name == b"te":
        return None if value.lower() == b"trailers" else "te other than trailers"
    if len(VALID_NAMES) < VALID_NAMES_LIMIT:
        VALID_NAMES.add(name)
    return None


def _value_problem(value: bytes) -> str | None:
    if BAD_VALUE.search(value):
        return _CRLF_NUL
    return _EDGE if value.strip(_EDGE_SPACE) != value else None


def _regular_problem(name: bytes, value: bytes) -> str | None:
    if name not in VALID_NAMES:
        problem = name_problem(name, value)
        if problem is not None:
            return problem
    return _value_problem(value)


def same_authority(host: bytes, authority: bytes, scheme: bytes | None) -> bool:
    """Whether a `host` field names what `:authority` names, after RFC 3986 §6.2.3 scheme-based
    normalization (RFC 9113 §8.3.1): case, and an empty or default port, do not matter."""
    host, authority = host.lower(), authority.lower()
    if host == authority:
        return True
    default = _DEFAULT_PORT.get(scheme.lower()) if scheme is not None else None
    return _without_port(host, default) == _without_port(authority, default)


def _without_port(authority: bytes, default: bytes | None) -> bytes:
    if authority.endswith(b":"):
        return authority[:-1]
    if default is not None and authority.endswith(default):
        return authority[: -len(default)]
    return authority


class RequestHead:
    """An HTTP/2 request's field block, split: pseudo-headers (None when absent), the regular
    fields in arrival order (a `host` that agrees with `:authority` left out: it adds nothing, and
    `:authority` is what routes), the declared content-length (-1: none) and `problem`, the first
    rule the block breaks (None: well-formed)."""

    __slots__ = ("method", "scheme", "authority", "path", "headers", "content_length", "problem")

    def __init__(
        self,
        method: bytes | None,
        scheme: bytes | None,
        authority: bytes | None,
        path: bytes | None,
        headers: list[tuple[bytes, bytes]],
        content_length: int,
        problem: str | None,
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.headers = headers
        self.content_length = content_length
        self.problem = problem


def request_head(fields: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """Splits and checks a request's field block (RFC 9113 §8.2, §8.2.1, §8.2.2, §8.3, and the
    content-length values of §8.1.1). A malformed block is still split as far as it goes, so that
    the refusal can be logged and answered in the client's terms (e.g. gRPC)."""
    pseudo: list[bytes | None] = [None, None, None, None]
    headers: list[tuple[bytes, bytes]] = []
    problem: str | None = None
    content_length = -1
    hosts = 0
    regular = False
    values: list[bytes] = []  # searched for CR, LF and NUL at once, after the loop
    valid_names = VALID_NAMES
    for field in fields:
        name, value = field
        if name[:1] == b":":
            slot = _PSEUDO_SLOTS.get(name)
            if slot is None:
                problem = problem or "unknown pseudo-header, or a response's"
            elif pseudo[slot] is not None:
                problem = problem or "repeated pseudo-header"
            else:
                pseudo[slot] = value
                if regular:
                    problem = problem or "pseudo-header after a regular field"
            continue
        regular = True
        values.append(value)
        if name not in valid_names:
            problem = problem or name_problem(name, value)
        if value.strip(_EDGE_SPACE) != value:
            problem = problem or _EDGE
        if name == b"host":
            hosts += 1
            authority = pseudo[2]
            if authority is None:
                headers.append(field)  # the only authority there is: routing reads it
            elif not same_authority(value, authority, pseudo[1]):
                problem = problem or "host differs from :authority"
            continue
        if name == b"content-length":
            length = parse_content_length(value)
            if length < 0:
                problem = problem or "invalid content-length"
            elif 0 <= content_length != length:
                problem = problem or "conflicting content-length"
            else:
                content_length = length
        headers.append(field)
    method, scheme, authority, path = pseudo
    if problem is None and BAD_VALUE.search(b"\t".join(values)):
        problem = _CRLF_NUL
    if problem is None:
        problem = _pseudo_problem(method, scheme, authority, path)
    if problem is None and hosts > 1:
        problem = "more than one host field"
    return RequestHead(method, scheme, authority, path, headers, content_length, problem)


def parse_content_length(value: bytes) -> int:
    """RFC 9110 §8.6: 1*DIGIT; -1 if not, or if too long for `int` to parse (over 4300 digits)."""
    if not value.isdigit():
        return -1
    try:
        return int(value)
    except ValueError:
        return -1


def _pseudo_problem(
    method: bytes | None, scheme: bytes | None, authority: bytes | None, path: bytes | None
) -> str | None:
    """RFC 9113 §8.3.1 (and §8.5 for CONNECT, which the proxy then refuses with 405)."""
    joined = b"".join([part for part in (method, scheme, authority, path) if part])
    if len(joined.translate(None, _CONTROL_OR_SPACE)) != len(joined):  # one was deleted
        return "control character or whitespace in a pseudo-header"
    if method is None:
        return "missing :method"
    if method == b"CONNECT":
        if scheme is not None or path is not None:
            return "CONNECT with :scheme or :path"
        return None if authority is not None else "CONNECT without :authority"
    if scheme is None or path is None:
        return "missing :scheme or :path"
    if not path:
        return "empty :path"
    if method not in _COMMON_METHODS and not _METHOD.fullmatch(method):
        return "invalid :method"
    if authority is not None and b"@" in authority:
        return "userinfo in :authority"  # RFC 9113 §8.3.1: never for http or https
    return None


def trailers_problem(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's trailer section is malformed (RFC 9113 §8.1, §8.2.1, §8.2.2, §8.3), or
    None."""
    for name, value in fields:
        if name[:1] == b":":
            return "pseudo-header in trailers"
        problem = _regular_problem(name, value)
        if problem is not None:
            return problem
    return None
