"""The simulator over real loopback sockets: HTTP/1.1 (raw bytes), h2c and TLS (ALPN h2 and
http/1.1) with an `h2` client; requests signed by botocore's SigV4Auth; the Lattice error shapes,
test hooks, streaming bodies, access log and shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time

import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sigv4proxy.sim.accesslog import FIELDS
from sigv4proxy.sim.server import SimConfig, start_simulator

HOST = "svc-0123.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
SVC = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123"
AK, SK = "AKIDSIMSERVER0000001", "sim-server-secret-NEVER-LOGGED-0123456789"
TOKEN = "sim-server-token-NEVER-LOGGED-abcdef"
PRINCIPAL = "arn:aws:sts::111122223333:assumed-role/app/worker-1"
IDENTITIES = {"identities": [{
    "access_key_id": AK, "secret_access_key": SK, "session_token": TOKEN, "principal": PRINCIPAL,
    "org_id": "o-sim", "principal_tags": {"team": "sim"},
}]}
POLICY = {"Statement": [
    {"Sid": "AllowApp", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:role/app"},
     "Action": "vpc-lattice-svcs:Invoke", "Resource": f"{SVC}/*"},
    {"Sid": "DenyAdmin", "Effect": "Deny", "Principal": "*", "Action": "vpc-lattice-svcs:Invoke",
     "Resource": f"{SVC}/admin/*"},
]}
IO_TIMEOUT = 20


def pattern(n: int) -> bytes:
    return bytes(i % 256 for i in range(n))


def sign(method: str, target: str, headers: dict | None = None, *, token: str | None = TOKEN,
         content_sha: str | None = "UNSIGNED-PAYLOAD", service: str = "vpc-lattice-svcs") -> list[tuple[str, str]]:
    hdrs = {"Host": HOST, **(headers or {})}
    if content_sha is not None:
        hdrs["X-Amz-Content-SHA256"] = content_sha
    req = AWSRequest(method=method, url=f"https://{HOST}{target}", headers=hdrs)
    SigV4Auth(Credentials(AK, SK, token), service, "us-west-2").add_auth(req)
    return list(req.headers.items())


@pytest.fixture
async def sim(tmp_path):
    server = await start_simulator(SimConfig(identities=IDENTITIES, policy=POLICY, service_arn=SVC,
                                             access_log=tmp_path / "access.log"))
    yield server
    await server.aclose()


# --- a raw HTTP/1.1 client: the exact bytes go on the wire ---

async def read_h1_response(reader: asyncio.StreamReader, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b"" if head_request else await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def raw_request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def h1(port: int, *requests: bytes, ssl_ctx: ssl.SSLContext | None = None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                   server_hostname=HOST if ssl_ctx else None)
    try:
        for req in requests:  # pipelined: all written before any answer is read
            writer.write(req)
        await writer.drain()
        return [await asyncio.wait_for(read_h1_response(reader, req.startswith(b"HEAD ")), IO_TIMEOUT)
                for req in requests]
    finally:
        writer.close()
        await writer.wait_closed()


async def h1_one(port, method, target, headers, body=b""):
    return (await h1(port, raw_request(method, target, headers, body)))[0]


# --- an h2 client (the `h2` library, client side) ---

async def h2_request(port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
                     ssl_ctx: ssl.SSLContext | None = None, alpn_expected: str | None = None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                   server_hostname=HOST if ssl_ctx else None)
    try:
        if alpn_expected is not None:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == alpn_expected
        return await asyncio.wait_for(_h2_exchange(reader, writer, method, target, headers, body, ssl_ctx), IO_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


async def _h2_exchange(reader, writer, method, target, headers, body, ssl_ctx):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    authority = next(v for k, v in headers if k.lower() == "host")
    req_headers = [(":method", method), (":scheme", "https" if ssl_ctx else "http"), (":authority", authority),
                   (":path", target)] + [(k.lower(), v) for k, v in headers if k.lower() != "host"]
    conn.send_headers(1, req_headers, end_stream=not body)
    writer.write(conn.data_to_send())
    status, resp_headers, data, trailers = None, {}, bytearray(), {}
    window = asyncio.Event()
    done = asyncio.Event()

    async def send_body():
        offset = 0
        while offset < len(body):
            room = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size, len(body) - offset)
            if room <= 0:
                window.clear()
                await window.wait()
                continue
            conn.send_data(1, body[offset:offset + room], end_stream=offset + room == len(body))
            offset += room
            writer.write(conn.data_to_send())
            await writer.drain()

    sender = asyncio.ensure_future(send_body())
    try:
        while not done.is_set():
            chunk = await reader.read(65536)
            assert chunk, "server closed the connection early"
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    resp_headers = dict(ev.headers)
                    status = int(resp_headers.pop(":status"))
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
                elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                    window.set()
                elif isinstance(ev, h2.events.StreamEnded):
                    done.set()
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {ev.error_code}")
            writer.write(conn.data_to_send())
        await sender
    finally:
        sender.cancel()
    return status, resp_headers, bytes(data), trailers


# --- verdicts over both protocols ---

async def test_botocore_signed_request_passes_over_http1(sim):
    headers = sign("GET", "/items/a%20b?color=red&size=2", {"X-Multi": "one", "User-Agent": "sim-test/1"})
    status, resp_headers, body = await h1_one(sim.port, "GET", "/items/a%20b?color=red&size=2", headers)
    assert status == 200, body
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL and echo["protocol"] == "HTTP/1.1"
    assert echo["path"] == "/items/a%20b" and echo["query"] == "color=red&size=2"
    assert echo["authority"] == HOST and echo["method"] == "GET"
    assert set(echo["signed_headers"]) >= {"host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"}
    assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest() and echo["body_length"] == 0
    received = dict((k, v) for k, v in echo["headers"])
    assert received["authorization"] == "REDACTED" and received["x-amz-security-token"] == "REDACTED"
    assert received["x-multi"] == "one"
    assert resp_headers["x-amzn-lattice-identity"] == f"Principal={PRINCIPAL}; PrincipalOrgID=o-sim; SessionName=worker-1"
    assert resp_headers["x-amzn-lattice-target"].startswith(f"ServiceArn={SVC}")
    assert SK not in body.decode() and TOKEN not in body.decode()


async def test_botocore_signed_request_passes_over_h2c_with_body(sim):
    body = b"payload-" * 1000
    headers = sign("POST", "/items", {"Content-Type": "text/plain"})
    status, resp_headers, data, _ = await h2_request(sim.port, "POST", "/items", headers, body)
    assert status == 200, data
    echo = json.loads(data)
    assert echo["protocol"] == "HTTP/2" and echo["authority"] == HOST
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest() and echo["body_length"] == len(body)


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("case, exception, fragment", [
    ("path", "InvalidSignatureException", "does not match"),
    ("query", "InvalidSignatureException", "does not match"),
    ("header", "InvalidSignatureException", "does not match"),
    ("payload_hash", "InvalidSignatureException", "Signed payloads are not supported"),
    ("no_content_sha", "IncompleteSignatureException", "x-amz-content-sha256"),
    ("wrong_service", "InvalidSignatureException", "correct service"),
    ("wrong_token", "UnrecognizedClientException", "security token"),
    ("unsigned", "AccessDeniedException", "not signed"),
    ("policy_deny", "AccessDeniedException", "explicit deny"),
])
async def test_rejections_are_lattice_style_403s(sim, proto, case, exception, fragment):
    method, target, extra = "GET", "/items/1?a=1", {"X-Signed": "yes"}
    kw = {}
    if case == "payload_hash":
        kw["content_sha"] = hashlib.sha256(b"").hexdigest()
    elif case == "no_content_sha":
        kw["content_sha"] = None
    elif case == "wrong_service":
        kw["service"] = "execute-api"
    elif case == "wrong_token":
        kw["token"] = "not-the-token"
    elif case == "policy_deny":
        target = "/admin/users"
    headers = sign(method, target, extra, **kw)
    if case == "path":
        target = "/items/2?a=1"
    elif case == "query":
        target = "/items/1?a=2"
    elif case == "header":
        headers = [(k, "no" if k == "X-Signed" else v) for k, v in headers]
    elif case == "unsigned":
        headers = [(k, v) for k, v in headers if k.lower() not in ("authorization",)]
    headers.append(("x-sim-status", "200"))  # hooks must not bypass auth
    if proto == "h1":
        status, resp_headers, body = await h1_one(sim.port, method, target, headers)
    else:
        status, resp_headers, body, _ = await h2_request(sim.port, method, target, headers)
    assert status == 403
    assert resp_headers["x-amzn-errortype"] == exception
    message = json.loads(body)["Message"]
    assert message.startswith(exception + ": ") and fragment in message
    for secret in (SK, TOKEN):
        assert secret not in body.decode()


async def test_denial_message_names_principal_and_resource(sim):
    headers = sign("GET", "/admin/users")
    status, _, body = await h1_one(sim.port, "GET", "/admin/users", headers)
    assert status == 403
    assert json.loads(body)["Message"] == (
        f"AccessDeniedException: User: {PRINCIPAL} is not authorized to perform: vpc-lattice-svcs:Invoke on "
        f"resource: {SVC}/admin/users with an explicit deny in a service-based policy")


async def test_time_skew_is_rejected(tmp_path):
    server = await start_simulator(SimConfig(identities=IDENTITIES, service_arn=SVC, clock=lambda: time.time() + 600))
    try:
        status, headers, body = await h1_one(server.port, "GET", "/x", sign("GET", "/x"))
    finally:
        await server.aclose()
    assert status == 403 and headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert "Signature expired" in json.loads(body)["Message"]


async def test_anonymous_allowed_only_when_auth_not_required_and_policy_allows():
    policy = {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "vpc-lattice-svcs:Invoke",
                             "Resource": "*", "Condition": {"StringEquals": {"vpc-lattice-svcs:RequestMethod": "GET"}}}]}
    server = await start_simulator(SimConfig(identities=IDENTITIES, policy=policy, service_arn=SVC, require_auth=False))
    try:
        ok = await h1_one(server.port, "GET", "/open", [("Host", HOST)])
        denied = await h1_one(server.port, "POST", "/open", [("Host", HOST)])
    finally:
        await server.aclose()
    assert ok[0] == 200 and json.loads(ok[2])["principal"] is None
    assert denied[0] == 403 and "User: anonymous" in json.loads(denied[2])["Message"]


# --- test hooks and streaming ---

@pytest.mark.parametrize("proto", ["h1", "h2"])
async def test_response_bytes_hook_streams_the_pattern(sim, proto):
    n = 3 * 65536 + 123
    headers = sign("GET", "/big", {"x-sim-response-bytes": str(n)})
    if proto == "h1":
        status, resp_headers, body = await h1_one(sim.port, "GET", "/big", headers)
    else:
        status, resp_headers, body, _ = await h2_request(sim.port, "GET", "/big", headers)
    assert status == 200
    assert len(body) == n and body == pattern(n)
    assert resp_headers["x-sim-body-sha256"] == hashlib.sha256(pattern(n)).hexdigest()


async def test_large_request_bodies_stream_and_hash(sim):
    body = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    expected = hashlib.sha256(body).hexdigest()
    headers = sign("PUT", "/upload")
    status, _, data = await h1_one(sim.port, "PUT", "/upload", headers, body)
    assert status == 200 and json.loads(data)["body_sha256"] == expected
    status, _, data, _ = await h2_request(sim.port, "PUT", "/upload", headers, body)
    assert status == 200 and json.loads(data)["body_sha256"] == expected
    assert json.loads(data)["body_length"] == len(body)


async def test_status_delay_and_trailer_hooks(sim):
    headers = sign("GET", "/hooks", {"x-sim-status": "503", "x-sim-delay-ms": "50", "x-sim-trailers": "1"})
    started = time.monotonic()
    status, _, data, trailers = await h2_request(sim.port, "GET", "/hooks", headers)
    assert time.monotonic() - started >= 0.05
    assert status == 503 and json.loads(data)["principal"] == PRINCIPAL
    assert trailers == {"x-sim-trailer": "ok"}


@pytest.mark.parametrize("hook, value", [("x-sim-status", "99"), ("x-sim-status", "abc"),
                                         ("x-sim-response-bytes", "-1"), ("x-sim-delay-ms", "999999")])
async def test_bad_hook_values_are_400(sim, hook, value):
    status, headers, body = await h1_one(sim.port, "GET", "/h", sign("GET", "/h", {hook: value}))
    assert status == 400 and headers["x-amzn-errortype"] == "ValidationException" and hook in body.decode()


async def test_http1_keepalive_pipelining_and_head(sim):
    a = raw_request("GET", "/one", sign("GET", "/one"))
    b = raw_request("HEAD", "/two", sign("HEAD", "/two"))
    c = raw_request("GET", "/three", sign("GET", "/three"))
    (s1, _, b1), (s2, head2, _), (s3, _, b3) = await h1(sim.port, a, b, c)
    assert (s1, s2, s3) == (200, 200, 200)
    assert json.loads(b1)["path"] == "/one" and json.loads(b3)["path"] == "/three"
    assert int(head2["content-length"]) > 0  # HEAD: the length of the body a GET would get, no body


async def test_expect_100_continue(sim):
    body = b"z" * 5000
    headers = sign("POST", "/c", {"Expect": "100-continue"}) + [("Content-Length", str(len(body)))]
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        head = "POST /c HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode())  # headers only: the body waits for "100 Continue"
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        status, _, data = await asyncio.wait_for(read_h1_response(reader), IO_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status == 200 and json.loads(data)["body_length"] == len(body)


async def test_malformed_http1_gets_400_not_a_hang(sim):
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(b"GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n")
    await writer.drain()
    status, _, _ = await asyncio.wait_for(read_h1_response(reader), IO_TIMEOUT)
    assert status == 400
    assert await asyncio.wait_for(reader.read(), IO_TIMEOUT) == b""  # and the connection is closed
    writer.close()
    await writer.wait_closed()


async def test_garbage_after_h2_preface_closes_the_connection(sim):
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    data_on_stream_0 = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # a protocol error (RFC 9113 6.1)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + data_on_stream_0)
    await writer.drain()
    rest = await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # settings, then GOAWAY, then EOF
    assert b"\x07\x00\x00\x00\x00\x00" in rest  # a GOAWAY frame header (type 7, stream 0), then EOF
    writer.close()
    await writer.wait_closed()


# --- TLS with ALPN ---

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "127.0.0.1")
    d = tmp_path_factory.mktemp("simtls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(d / "cert.pem"), str(d / "key.pem"), client


async def test_tls_alpn_h2_and_http1(tls, tmp_path):
    cert, key, client = tls
    log = tmp_path / "tls.log"
    server = await start_simulator(SimConfig(identities=IDENTITIES, service_arn=SVC, tls_cert=cert, tls_key=key,
                                             access_log=log))
    try:
        client.set_alpn_protocols(["h2"])
        status, _, data, _ = await h2_request(server.port, "GET", "/tls", sign("GET", "/tls"), ssl_ctx=client,
                                              alpn_expected="h2")
        assert status == 200 and json.loads(data)["protocol"] == "HTTP/2"
        client.set_alpn_protocols(["http/1.1"])
        (status, _, body), = await h1(server.port, raw_request("GET", "/tls1", sign("GET", "/tls1")), ssl_ctx=client)
        assert status == 200 and json.loads(body)["protocol"] == "HTTP/1.1"
        records = server.records
    finally:
        await server.aclose()
    assert [r["protocol"] for r in records] == ["HTTP/2", "HTTP/1.1"]
    assert all(r["sslCipher"] != "-" and r["tlsVersion"].startswith("TLS") for r in records)


# --- access log ---

async def test_access_log_fields_and_no_secrets(sim, tmp_path):
    signed = sign("GET", "/logged?x=1", {"User-Agent": "sim-test/2"})
    signature = next(v for k, v in signed if k == "Authorization").rsplit("=", 1)[1]
    await h1_one(sim.port, "GET", "/logged?x=1", signed)
    await h1_one(sim.port, "GET", "/admin/x", sign("GET", "/admin/x"))
    await h1_one(sim.port, "GET", "/nope", [("Host", HOST)])
    await sim.aclose()  # flushes and closes the file
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records == sim.records
    for rec in records:
        assert list(rec) == list(FIELDS)
    ok, denied, unsigned = records
    assert (ok["responseCode"], ok["callerPrincipal"], ok["requestPath"]) == (200, PRINCIPAL, "/logged")
    assert ok["userAgent"] == "sim-test/2" and ok["hostHeader"] == HOST and ok["protocol"] == "HTTP/1.1"
    assert ok["authDeniedReason"] == "-" and ok["callerPrincipalTags"] == {"team": "sim"}
    assert ok["serviceArn"] == SVC and ok["sourceIpPort"].startswith("127.0.0.1:")
    assert (denied["responseCode"], denied["authDeniedReason"]) == (403, "explicit_deny:DenyAdmin")
    assert (unsigned["responseCode"], unsigned["callerPrincipal"]) == (403, "-")
    text = "\n".join(lines)
    for secret in (SK, TOKEN, signature):
        assert secret not in text


async def test_aclose_stops_listening_and_in_flight_requests(tmp_path):
    server = await start_simulator(SimConfig(identities=IDENTITIES, service_arn=SVC))
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request("GET", "/slow", sign("GET", "/slow", {"x-sim-delay-ms": "30000"})))
    await writer.drain()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await server.aclose()
    assert time.monotonic() - started < 10
    assert await asyncio.wait_for(reader.read(), IO_TIMEOUT) == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
