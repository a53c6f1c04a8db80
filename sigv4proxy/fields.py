"""HTTP field validity in one place: what makes a field name or value valid (RFC 9110 §5, RFC 9113
§8.2).

Owns: the field-name and field-value rules, the connection-specific names, a bounded cache of names
already found valid, and content-length parsing. Used by the HTTP/2 response checks in
`upstream.h2_wire`. Must never: import anything of the proxy, put a field's name or value in a
reason, or grow a cache without bound.
"""

from __future__ import annotations

import re

# RFC 9110 §5.1: a field name is a token; RFC 9113 §8.2: lower-case only on HTTP/2.
TOKEN_NAME = re.compile(rb"[a-z0-9!#$%&'*+\-.^_`|~]+")
BAD_VALUE = re.compile(rb"[\r\n\x00]")  # RFC 9113 §8.2.1: never anywhere in a value
# RFC 9113 §8.2.2 (RFC 9110 §7.6.1): never in an HTTP/2 message; `te` is allowed as "trailers" only
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"})
# Names already found valid and neither connection-specific nor `te` (whose value matters).
VALID_NAMES: set[bytes] = set()
VALID_NAMES_LIMIT = 4096


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


def parse_content_length(value: bytes) -> int:
    """RFC 9110 §8.6: 1*DIGIT; -1 if not, or if too long for `int` to parse (over 4300 digits)."""
    if not value.isdigit():
        return -1
    try:
        return int(value)
    except ValueError:
        return -1
