"""Hypothesis fuzzing of the inbound request path (over a real socket) and of the canonicalizer.

The proxy (in front of the Lattice simulator) runs on its own event loop in a thread; examples are
sent with blocking sockets, each followed by a write shutdown so that an incomplete request ends.
For every input the proxy must answer 2xx/4xx, or 5xx with a reason (`x-sigv4proxy-error`), or
close, within a bound, never crash, and then still serve a valid request. After the HTTP/2 preface
(h2c), random frame sequences must get well-formed HTTP/2 frames back, and a request head the `h2`
library's validator calls malformed must get a 400 on its own stream, never a GOAWAY.

Bounded in `make test` (SIGV4PROXY_FUZZ_EXAMPLES, default 30 per test); `make fuzz` raises it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import string
import time
from typing import Iterator

import h2.exceptions
import hpack
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.loop_thread import LoopThread
from support.proxy import LATTICE_HOST, SERVICE_ARN, running_proxy, write_identities

from sigv4proxy.errors import BadRequest
from sigv4proxy.aws.signing import canonical_query, canonical_uri
from sigv4proxy.sim.server import SimConfig, start_simulator

EXAMPLES = int(os.environ.get("SIGV4PROXY_FUZZ_EXAMPLES", "30"))
ANSWER_TIMEOUT = 10.0  # a hang fails the example
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 30,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CANON = settings(max_examples=EXAMPLES * 20, deadline=1000, derandomize=EXAMPLES <= 30)
H = LATTICE_HOST.encode()
VALID = b"GET /alive HTTP/1.1\r\nHost: " + H + b"\r\nConnection: close\r\n\r\n"


class BackgroundProxy(LoopThread):
    """The simulator and a proxy in front of it, on an event loop in a daemon thread."""

    def __init__(self, tmp_dir) -> None:
        super().__init__("fuzz-proxy")
        self.tmp_dir = tmp_dir
        self.port = 0
        self.proxy = None

    async def start(self) -> None:
        sim = await start_simulator(SimConfig(host="127.0.0.1", port=0, service_arn=SERVICE_ARN, policy=None,
                                              identities=str(write_identities(self.tmp_dir))))
        self.stack.push_async_callback(sim.aclose)
        self.proxy = await self.stack.enter_async_context(running_proxy(
            upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2", max_body_size=65536,
            first_byte_timeout=3))
        self.port = self.proxy.port


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[BackgroundProxy]:
    with BackgroundProxy(tmp_path_factory.mktemp("fuzz")) as background:
        yield background


def exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    """Sends `data`, ends the write side (unless told not to), returns everything the proxy
    answered until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may refuse mid-request; what it answered is still readable
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)  # socket.timeout here is a hang: the example fails
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3}) ")  # aiohttp mirrors a request's "HTTP/2.0"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4: the connection speaks HTTP/2


def check_h2_answer(raw: bytes) -> None:
    """An HTTP/2 server's answer: whole frames of known types, the first its SETTINGS (§3.4)."""
    types, pos = [], 0
    while pos < len(raw):
        assert len(raw) - pos >= 9, raw[pos:pos + 50]  # no cut frame header
        length, kind, stream = int.from_bytes(raw[pos:pos + 3], "big"), raw[pos + 3], raw[pos + 5:pos + 9]
        assert kind <= 9 and pos + 9 + length <= len(raw), raw[pos:pos + 50]
        if kind in (4, 6, 7):  # SETTINGS, PING, GOAWAY belong to the connection
            assert int.from_bytes(stream, "big") & 0x7FFFFFFF == 0, raw[pos:pos + 50]
        types.append(kind)
        pos += 9 + length
    assert types[:1] == [4], raw[:50]


def check_answer(raw: bytes, sent: bytes = b"", upstream_statuses: frozenset[int] = frozenset()) -> None:
    """Every response in `raw` is 1xx/2xx/3xx/4xx, or 5xx with the proxy's reason header (unless
    the upstream itself sent that status: in `upstream_statuses`); after the HTTP/2 preface,
    well-formed HTTP/2 frames instead."""
    if sent.startswith(H2_PREFACE):
        check_h2_answer(raw)
        return
    for match in _STATUS_LINE.finditer(raw):
        status = int(match.group(1))
        head = raw[match.start():raw.find(b"\r\n\r\n", match.start())].lower()
        assert 100 <= status < 600, raw[:200]
        if status >= 500 and status not in upstream_statuses:
            assert b"x-sigv4proxy-error:" in head, raw[:300]
    if raw:
        assert _STATUS_LINE.match(raw), raw[:200]  # an answer starts with a status line


def assert_still_serving(port: int) -> None:
    answer = exchange(port, VALID)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


# --- inbound request path ----------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=2048))
@example(data=H2_PREFACE)  # an h2c connection with nothing after the preface
@example(data=H2_PREFACE + b"\x00\x00\x00\x09garbage")  # then a stray CONTINUATION: GOAWAY
def test_random_bytes(proxy, data):
    check_answer(exchange(proxy.port, data), data)
    assert_still_serving(proxy.port)


TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=20)
ODD_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=40)
METHODS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"]) | TOKEN
TARGETS = st.one_of(
    st.builds(lambda p, q: "/" + p + ("?" + q if q else ""),
              st.text(alphabet=string.printable.replace(" ", "").replace("\r", "").replace("\n", ""), max_size=40),
              st.text(alphabet=string.ascii_letters + "%=&+;/?", max_size=30)),
    st.builds(lambda h, p: f"http://{h}/{p}", st.sampled_from([LATTICE_HOST, "example.com", LATTICE_HOST + ":443"]),
              st.text(alphabet=string.ascii_letters + "/%.", max_size=20)),
    st.sampled_from(["*", LATTICE_HOST + ":443", "", "//", "/%", "/%zz?%", "/a b"]),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "HTTP/1.10"])
HEADER_NAMES = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect",
                                "Authorization", "X-Amz-Date", "X-Amz-Security-Token", "Upgrade", "TE",
                                "Trailer", "Proxy-Connection", "Keep-Alive"]) | TOKEN
HEADER_VALUES = st.one_of(
    ODD_TEXT,
    st.sampled_from(["chunked", "chunked, chunked", "gzip, chunked", "identity", "100-continue", "close",
                     "keep-alive, X-Foo", "0", "-1", "5, 5", "99999999999999999999", LATTICE_HOST,
                     LATTICE_HOST + ":99999", "user@" + LATTICE_HOST, "websocket"]),
)


@st.composite
def near_valid_requests(draw) -> bytes:
    method = draw(METHODS)
    target = draw(TARGETS)
    version = draw(VERSIONS)
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()):
        headers.append(("Host", LATTICE_HOST))
    headers += draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
    separator = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    head = f"{method} {target} {version}{separator}" + "".join(f"{n}: {v}{separator}" for n, v in headers)
    body = draw(st.one_of(st.just(b""), st.binary(max_size=300),
                          st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"5\r\nhel"])))
    return head.encode("latin-1") + separator.encode() + body


@FUZZ
@given(request=near_valid_requests())
def test_near_valid_requests(proxy, request):
    check_answer(exchange(proxy.port, request), request)
    assert_still_serving(proxy.port)



# --- inbound HTTP/2 (h2c): frame sequences after the preface -----------------------------------
def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _request_block(path: str, extra: list[tuple[str, str]]) -> bytes:
    import hpack  # the `h2` library's own encoder: an independent source of valid blocks

    return hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", path),
                                   (":authority", LATTICE_HOST)] + extra)


STREAM_IDS = st.sampled_from([0, 1, 1, 3, 3, 5, 2, 0x7FFFFFFF, 0x80000001])
H2_FRAMES = st.one_of(
    # anything: every type (10+ is unknown and must be ignored), any flags, short payloads
    st.builds(h2_frame, st.integers(0, 12), st.integers(0, 255), STREAM_IDS, st.binary(max_size=64)),
    # a valid request head, possibly without END_STREAM / END_HEADERS, odd extra fields
    st.builds(lambda stream, flags, path, extra: h2_frame(1, flags, stream, _request_block(path, extra)),
              STREAM_IDS, st.sampled_from([0x5, 0x5, 0x4, 0x1, 0x0, 0x25]),
              st.sampled_from(["/alive", "/", "/a?b=c", "", "*", "/%zz"]),
              st.lists(st.tuples(st.sampled_from(["te", "connection", "x-a", "content-length", ":path",
                                                  "authorization", "Upper"]),
                                 st.sampled_from(["trailers", "close", "1", "", "x" * 100])), max_size=2)),
    # flow control and settings with edge values
    st.builds(lambda stream, inc: h2_frame(8, 0, stream, inc.to_bytes(4, "big")),
              STREAM_IDS, st.sampled_from([0, 1, 65535, 0x7FFFFFFF, 0xFFFFFFFF])),
    st.builds(lambda ident, value: h2_frame(4, 0, 0, ident.to_bytes(2, "big") + value.to_bytes(4, "big")),
              st.integers(0, 9), st.sampled_from([0, 1, 16383, 16384, 65535, 2**24, 2**31 - 1, 2**32 - 1])),
    st.builds(lambda stream, body: h2_frame(0, 1, stream, body), STREAM_IDS, st.binary(max_size=64)),
)


def exchange_h2(port: int, data: bytes, quiet: float = 0.15) -> bytes:
    """Sends `data` and reads the answer until the proxy closes or stays quiet for `quiet` seconds
    (an HTTP/2 connection waits for more frames, and a client's EOF ends it unanswered, as in
    nginx and Go: so no write shutdown here). More than ANSWER_TIMEOUT of talk fails."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            # the server's SETTINGS always come first (or a close): wait for them in full, and
            # only then for quiet (a busy machine may take longer than `quiet` for the first)
            sock.settimeout(quiet if chunks else max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        else:
            raise AssertionError("the proxy kept talking past the bound")
    return b"".join(chunks)


@FUZZ
@given(settings_first=st.sampled_from([True, True, True, False]),
       before=st.lists(H2_FRAMES, max_size=3), request=st.booleans(), after=st.lists(H2_FRAMES, max_size=5))
# found by `make fuzz`: the answer's window shut (SETTINGS_INITIAL_WINDOW_SIZE 0), then the client
# leaves; its request stayed in flight (test_the_proxy_survived_the_fuzzing counts them)
@example(settings_first=True, before=[], request=True, after=[h2_frame(4, 0, 0, b"\x00\x04\x00\x00\x00\x00")])
def test_random_h2_frames(proxy, settings_first, before, request, after):
    """After the preface, any frame sequence (often around a valid request on stream 1, so the
    proxying path runs too) gets well-formed HTTP/2 frames back, and the proxy serves on."""
    data = b"".join([H2_PREFACE, h2_frame(4, 0, 0, b"") if settings_first else b"", *before,
                     h2_frame(1, 0x5, 1, _request_block("/alive", [])) if request else b"", *after])
    check_answer(exchange_h2(proxy.port, data), data)
    assert_still_serving(proxy.port)


# --- inbound HTTP/2: malformed request fields are stream errors (RFC 9113 §8.1.1) --------------
# The oracle is the `h2` library's own request validator, plus the rules this proxy adds to it
# (`_stricter_here`). A block either calls malformed gets a 400 `malformed_request` on its stream;
# any other block never does; the valid requests beside it are answered 200; and no GOAWAY.
_H2_REQUEST = HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False,
                                    is_push_promise=False)
_TOKEN_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
FIELD_NAMES = st.sampled_from(["x-a", "X-A", "x a", "x:a", "", "x(a)", "connection", "keep-alive",
                               "proxy-connection", "transfer-encoding", "upgrade", "te", "host",
                               ":foo", ":status", ":path", ":authority"])
FIELD_VALUES = st.sampled_from(["ok", "trailers", "gzip", "100", " lead", "trail\t", "a\r\nb", "nul\x00",
                                "", "in side", LATTICE_HOST, "other.example"])
PSEUDO_VALUES = {":method": ["GET", "POST", "CONNECT", "G T", ""], ":scheme": ["http", "https", ""],
                 ":path": ["/fuzz", "", "/a b", "*"]}
MUTATIONS = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 8), FIELD_NAMES, FIELD_VALUES),
    st.tuples(st.just("drop"), st.sampled_from(sorted(PSEUDO_VALUES))),
    st.sampled_from([("set", name, value) for name, values in PSEUDO_VALUES.items() for value in values]),
    st.tuples(st.just("repeat"), st.sampled_from([*PSEUDO_VALUES, ":authority"])),
)


def _mutated(mutations) -> list[tuple[bytes, bytes]]:
    fields = [(":method", "GET"), (":scheme", "http"), (":authority", LATTICE_HOST), (":path", "/fuzz")]
    for mutation in mutations:
        if mutation[0] == "insert":
            fields.insert(mutation[1], (mutation[2], mutation[3]))
        elif mutation[0] == "drop":
            fields = [f for f in fields if f[0] != mutation[1]]
        elif mutation[0] == "set":
            fields = [(n, mutation[2] if n == mutation[1] else v) for n, v in fields]
        else:
            fields += [f for f in fields if f[0] == mutation[1]][:1]
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields]


def _h2_calls_malformed(fields) -> bool:
    try:
        list(validate_headers(fields, _H2_REQUEST))
    except h2.exceptions.ProtocolError:
        return True
    return False


def _stricter_here(fields) -> bool:
    """What `sigv4proxy.fields` refuses beyond h2's RFC 9113 minimum: a field name must be an RFC
    9110 token, and pseudo-header values are request-line parts (no whitespace or control
    character anywhere, a non-empty :method)."""
    for name, value in fields:
        if name[:1] == b":":
            if re.search(rb"[\x00-\x20\x7f]", value) or (name == b":method" and not value):
                return True
        elif not _TOKEN_NAME.fullmatch(name):
            return True
    return False


def _h2_streams(port: int, blocks: dict[int, bytes]) -> tuple[dict[int, dict], list[int]]:
    """Sends the preface and one HEADERS frame (END_STREAM) per stream, in one write; reads until
    every stream has ended or been reset. Returns {stream: {status, headers, reset}} and the error
    codes of any GOAWAY."""
    frames = [H2_PREFACE, h2_frame(4, 0, 0, b"")]
    frames += [h2_frame(1, 0x5, sid, block) for sid, block in blocks.items()]
    decoder = hpack.Decoder()
    streams: dict[int, dict] = {}
    goaways: list[int] = []
    buffer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        sock.sendall(b"".join(frames))
        while len([s for s in streams.values() if s.get("done")]) < len(blocks):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                sid = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                stream = streams.setdefault(sid, {})
                if kind == 1:  # HEADERS (the proxy's answers are small: never CONTINUATION)
                    assert flags & 0x4, "a response head split into CONTINUATION frames"
                    fields = decoder.decode(payload, raw=True)
                    stream.setdefault("headers", dict(fields))
                if kind == 3:  # RST_STREAM
                    stream["reset"] = int.from_bytes(payload[:4], "big")
                if kind == 7:  # GOAWAY
                    goaways.append(int.from_bytes(payload[4:8], "big"))
                if kind in (0, 1) and flags & 0x1 or kind == 3:
                    stream["done"] = True
    return streams, goaways


@FUZZ
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_malformed_request_fields_are_refused_on_their_stream_only(proxy, mutations):
    fields = _mutated(mutations)
    malformed = _h2_calls_malformed(fields) or _stricter_here(fields)
    encoder = hpack.Encoder()  # the blocks are encoded in the order they are sent
    valid = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", H), (b":path", b"/alive")]
    blocks = {1: encoder.encode(valid), 3: encoder.encode(fields), 5: encoder.encode(valid)}
    streams, goaways = _h2_streams(proxy.port, blocks)
    assert goaways == [], goaways
    for sid in (1, 5):
        assert streams[sid]["headers"][b":status"] == b"200", streams[sid]
    answer = streams[3].get("headers", {})
    kind = answer.get(b"x-sigv4proxy-error")
    if malformed:
        assert answer.get(b":status") == b"400" and kind == b"malformed_request", (fields, streams[3])
    else:
        assert kind != b"malformed_request" and streams[3].get("reset") != 1, (fields, streams[3])


def test_the_proxy_survived_the_fuzzing(proxy):
    assert_still_serving(proxy.port)
    assert proxy.proxy.exchange.inflight == 0


# --- the canonicalizer ---------------------------------------------------------------------------
@CANON
@given(path=st.text(max_size=80), normalize=st.booleans(), double_encode=st.booleans())
def test_canonical_uri_raises_only_bad_request(path, normalize, double_encode):
    try:
        result = canonical_uri(path, normalize=normalize, double_encode=double_encode)
    except BadRequest:
        assert not path.startswith("/") or "?" in path or "#" in path
        return
    assert isinstance(result, str) and result.startswith("/")
    if double_encode:  # fully encoded: unreserved characters, '/' and %XX escapes only
        assert re.fullmatch(r"(?:[A-Za-z0-9\-_.~/]|%[0-9A-F]{2})*", result), result


@CANON
@given(path=st.text(alphabet=string.ascii_letters + "/.%~-_", max_size=60).map(lambda p: "/" + p))
def test_canonical_uri_normalization_is_idempotent(path):
    once = canonical_uri(path, normalize=True, double_encode=False)
    assert canonical_uri(once, normalize=True, double_encode=False) == once


@CANON
@given(query=st.text(max_size=80))
def test_canonical_query_raises_only_bad_request_and_is_idempotent(query):
    try:
        once = canonical_query(query)
    except BadRequest:
        assert re.search(r"%(?![0-9A-Fa-f]{2})", query), query  # only malformed escapes are refused
        return
    assert canonical_query(once) == once
    pairs = [p.split("=", 1) for p in once.split("&")] if once else []
    assert pairs == sorted(pairs)
    assert all(len(p) == 2 for p in pairs)
    assert re.fullmatch(r"(?:[A-Za-z0-9\-_.~=&]|%[0-9A-F]{2})*", once), once
