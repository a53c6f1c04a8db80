"""Request hygiene, routing and signing: what every inbound request goes through before upstream.

Owns: which request headers are forwarded (hop-by-hop and client-supplied signing headers dropped,
the header options applied), the Host/authority check, the body-size check and the signing call.
Shared by the HTTP/1.1 and HTTP/2 inbound paths. Must never: forward a request unsigned, let a
client's own signing headers through, or put a header value in an error message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sigv4proxy.aws.credentials import CredentialStore
from sigv4proxy.aws.routing import Router, Target
from sigv4proxy.errors import BadRequest, MethodNotSupported, PayloadTooLarge
from sigv4proxy.fields import DROP_REQUEST

_NAME_CACHE_LIMIT = 1024
# What prepare() does with a request header, learned once per raw name spelling (bounded).
_FORWARD, _DROP, _HOST, _UPGRADE, _CONNECTION, _EXPECT, _TE, _COOKIE = range(8)
_REQUEST_ACTIONS = {"host": _HOST, "upgrade": _UPGRADE, "connection": _CONNECTION, "expect": _EXPECT, "te": _TE}


def split_target(raw: str) -> tuple[str | None, str]:
    """(authority or None, origin-form path?query) from a request target."""
    if raw.startswith("/"):
        return None, raw
    lower = raw[:8].lower()
    if lower.startswith("http://") or lower.startswith("https://"):
        rest = raw.split("://", 1)[1]
        slash = rest.find("/")
        question = rest.find("?")
        cut = min(i for i in (slash, question, len(rest)) if i >= 0)
        authority, path = rest[:cut], rest[cut:]
        if not authority:
            raise BadRequest("absolute-form target without a host")
        if "#" in path:
            raise BadRequest("fragment in request target")
        if not path.startswith("/"):
            path = "/" + path
        return authority, path
    raise BadRequest("unsupported request target form")


def _join_cookies(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """HTTP/2 cookie crumbs as one `cookie` field, joined with "; " (RFC 9113 §8.2.3), where the
    first crumb stood."""
    crumbs = [value for name, value in headers if name == b"cookie"]
    joined = (b"cookie", b"; ".join(crumbs))
    first = next(i for i, (name, _) in enumerate(headers) if name == b"cookie")
    rest = [h for h in headers[first + 1 :] if h[0] != b"cookie"]
    return [*headers[:first], joined, *rest]


@dataclass(slots=True)
class PreparedRequest:
    """A request after hygiene, routing and signing: what goes to `ConnectionPool.request`."""

    route: Target
    headers: list[tuple[bytes, bytes]]  # cleaned + signed, names lowercase, no Host
    expect_continue: bool
    sign_started: float  # perf_counter stamps for the stage timings
    sign_done: float


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """What prepare takes from the config (derived once, at start): the body-size limit and the
    header options (the Go sidecar's drop-in ones among them)."""

    max_body_size: int | None = None  # a declared body over this: 413 before anything is sent
    strip_headers: tuple[str, ...] = ()  # dropped from every request
    add_headers: tuple[tuple[str, str], ...] = ()  # added to every request
    duplicate_headers: tuple[str, ...] = ()  # forwarded as x-original-<name> before we replace it

    @classmethod
    def from_options(
        cls, max_body_size: int | None, strip: Iterable[str], add: Iterable[str], duplicate: Iterable[str]
    ) -> HeaderRules:
        """From the config's forms (`add` as NAME=VALUE strings)."""
        return cls(
            max_body_size,
            tuple(strip),
            tuple(tuple(h.split("=", 1)) for h in add),  # type: ignore[misc]
            tuple(duplicate),
        )


class RequestPreparer:
    """Header rules precomputed once (the Go sidecar's drop-in options included); one per worker."""

    def __init__(
        self,
        router: Router,
        credentials: CredentialStore,
        rules: HeaderRules = HeaderRules(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._router = router
        self._credentials = credentials
        self._max_body = rules.max_body_size
        self._clock = clock
        self._request_names: dict[bytes, tuple[bytes, int, bytes | None]] = {}
        self._signed_names: dict[object, frozenset[bytes]] = {}  # per signer
        self._drop = DROP_REQUEST | {h.lower() for h in rules.strip_headers}
        self._add = [(n.strip().lower().encode("latin-1"), v.strip().encode("latin-1")) for n, v in rules.add_headers]
        self._duplicate = {h.lower(): "x-original-" + h.lower() for h in rules.duplicate_headers}

    def prepare(
        self,
        method: str,
        authority: str | None,
        target: str,
        raw_headers: Iterable[tuple[bytes, bytes]],
        content_length: int | None,
        original_dst: tuple[str, int] | None = None,
        from_h2: bool = False,
    ) -> PreparedRequest:
        """Header hygiene, route, body-size check and signing: shared by both inbound paths.

        `authority` is the absolute-form authority (HTTP/1.1) or `:authority` (HTTP/2); a Host
        header must agree with it. `target` is origin-form. `from_h2` (an HTTP/2 request): keeps
        `te: trailers` on the wire (gRPC; the signer never signs `te`) and joins the cookie crumbs
        into one field (RFC 9113 §8.2.3), so every upstream protocol gets the value signed.
        `expect: 100-continue` is passed on (the upstream may refuse before the body is sent).
        """
        if method == "CONNECT":
            raise MethodNotSupported("CONNECT is not supported (VPC Lattice does not tunnel)")
        # Forwarded headers stay bytes (lowercase names): only the few the signer signs are
        # decoded for it.
        headers: list[tuple[bytes, bytes]] = []
        host_header: str | None = None
        names = self._request_names
        connection_tokens: set[bytes] | None = None
        expect_continue = False
        cookies = 0
        for name_b, value_b in raw_headers:
            known = names.get(name_b)
            if known is None:
                known = self._request_name(name_b)
            lname, action, copy_as = known
            if copy_as is not None:
                headers.append((copy_as, value_b))
            if action == _FORWARD:
                headers.append((lname, value_b))
            elif action == _COOKIE:
                headers.append((lname, value_b))
                cookies += 1
            elif action == _HOST:
                if host_header is not None:
                    raise BadRequest("more than one Host header")
                host_header = value_b.decode("latin-1")
            elif action == _UPGRADE:
                # An h2c upgrade offer (curl --http2 on http://) may be declined by answering in
                # HTTP/1.1 (RFC 9113 §3.1, RFC 9110 §7.8); any other protocol switch is refused.
                if any(t.strip().lower() != b"h2c" for t in value_b.split(b",")):
                    raise BadRequest("protocol upgrade is not supported")
            elif action == _CONNECTION:
                tokens = {t.strip().lower() for t in value_b.split(b",")}
                connection_tokens = (connection_tokens or set()) | tokens
            elif action == _EXPECT:
                expect_continue = value_b.strip().lower() == b"100-continue"
                if expect_continue:
                    headers.append((b"expect", b"100-continue"))
            elif action == _TE and from_h2 and value_b.strip().lower() == b"trailers":
                headers.append((b"te", b"trailers"))
        if connection_tokens:
            connection_tokens -= {b"close", b"keep-alive"}
            headers = [h for h in headers if h[0] not in connection_tokens]
        if cookies > 1 and from_h2:
            headers = _join_cookies(headers)
        if self._add:
            headers.extend(self._add)
        if authority is not None:
            if host_header is not None and host_header.strip().lower() != authority.lower():
                raise BadRequest("absolute-form target and Host header disagree")
            host_header = authority
        route = self._router.resolve(host_header, target, original_dst=original_dst)

        if self._max_body is not None and content_length is not None and content_length > self._max_body:
            raise PayloadTooLarge("request body exceeds --max-body-size")

        # Sign: the credentials snapshot raises CredentialsUnavailable (503) when there are none.
        creds = self._credentials.snapshot()
        path, _, query = target.partition("?")
        signer = route.signer
        signed = self._signed_names.get(signer)
        if signed is None:
            signed = self._signed_names[signer] = frozenset(n.encode("latin-1") for n in signer.signed_header_names)
        # host travels as :authority / Host (never in `headers`); the rest only if signed
        to_sign = [("host", route.authority)]
        if len(signed) > 1:
            to_sign += [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers if n in signed]
        sign_started = time.perf_counter()
        headers += signer.sign_wire(method, path, query, to_sign, creds, self._clock())
        sign_done = time.perf_counter()
        return PreparedRequest(route, headers, expect_continue, sign_started, sign_done)

    def _request_name(self, name_b: bytes) -> tuple[bytes, int, bytes | None]:
        """(lowercase name, what to do with it, name of its --duplicate-header copy or None);
        remembered per raw spelling (bounded: names come from clients)."""
        name = name_b.decode("latin-1").lower()
        action = _FORWARD
        if name in self._drop:
            action = _REQUEST_ACTIONS.get(name, _DROP)
        elif name == "cookie":
            action = _COOKIE
        copy_as = self._duplicate.get(name)
        known = (name.encode("latin-1"), action, None if copy_as is None else copy_as.encode("latin-1"))
        if len(self._request_names) < _NAME_CACHE_LIMIT:
            self._request_names[bytes(name_b)] = known
        return known
