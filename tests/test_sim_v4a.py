"""The simulator's SigV4A verifier (`sim/verify_v4a.py`) as an oracle.

Checked against sources that are not the proxy: the aws-c-auth `v4a/` corpus (each case's public
key, canonical request, string to sign and both of its signatures) and awscrt's own SigV4A signer,
with real requests sent over loopback sockets to a running simulator. Tampered requests, a region
set that excludes the simulator's region, skewed clocks and wrong keys are refused with the same
Lattice error names as SigV4.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json

import pytest
from awscrt import auth as crt_auth
from awscrt import http as crt_http
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TESTSUITE, corpus_params
from sigv4proxy.sim.identities import IdentityStore
from sigv4proxy.sim.server import SimConfig, start_simulator
from sigv4proxy.sim.verify import AuthFailure, RequestView, VerifyContext, canonical_request, verify_request
from sigv4proxy.sim.verify_v4a import (
    P256_ORDER,
    parse_authorization_v4a,
    private_scalar,
    public_key_for,
    region_set_covers,
    signature_matches,
    string_to_sign_v4a,
)
from support.proxy import ACCESS_KEY, PRINCIPAL, SECRET_KEY, SESSION_TOKEN, write_identities
from test_signing_corpus import parse_raw_request

V4A_DIR = TESTSUITE / "aws-c-auth-aws-signing-test-suite" / "v4a"
SERVICE = "vpc-lattice-svcs"
SIM_REGION = "us-west-2"
HOST = "svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
SIGNED_AT = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
SIGNED_EPOCH = SIGNED_AT.timestamp()


# --- the aws-c-auth v4a corpus ---

def corpus_cases() -> list[str]:
    if not V4A_DIR.is_dir():
        return []
    return sorted(p.name for p in V4A_DIR.iterdir() if (p / "public-key.json").is_file())


def corpus_public_key(case_dir) -> ec.EllipticCurvePublicKey:
    xy = json.loads((case_dir / "public-key.json").read_text())
    return ec.EllipticCurvePublicNumbers(int(xy["X"], 16), int(xy["Y"], 16), ec.SECP256R1()).public_key()


def flip_last_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


@pytest.mark.parametrize("case", corpus_params(corpus_cases()))
def test_v4a_corpus_case(testsuite_dir, case):
    case_dir = testsuite_dir / "aws-c-auth-aws-signing-test-suite" / "v4a" / case
    ctx = json.loads((case_dir / "context.json").read_text())
    creds = ctx["credentials"]

    # The public key derived from the secret is the case's.
    derived = public_key_for(creds["access_key_id"], creds["secret_access_key"])
    expected_key = corpus_public_key(case_dir)
    assert derived.public_numbers() == expected_key.public_numbers()

    # The header-signed request: rebuild its canonical request and string to sign with the
    # simulator's own canonicalisation (Lattice's rules normalize paths, so only those cases).
    method, path, query, raw_headers, body = parse_raw_request((case_dir / "header-signed-request.txt").read_text())
    headers = [(n.lower(), v) for n, v in raw_headers]
    auth = parse_authorization_v4a(next(v for n, v in headers if n == "authorization"))
    amz_date = next(v.strip() for n, v in headers if n == "x-amz-date")
    expected_creq = (case_dir / "header-canonical-request.txt").read_text()
    expected_sts = (case_dir / "header-string-to-sign.txt").read_text()
    if ctx["normalize"]:
        creq = canonical_request(RequestView(method, path, query, headers), auth.signed_headers,
                                 auth.signed_headers_raw, hashlib.sha256(body).hexdigest())
        assert creq == expected_creq
        assert string_to_sign_v4a(amz_date, auth.scope, creq) == expected_sts
    else:  # the string to sign still follows from the (unnormalized) canonical request
        assert string_to_sign_v4a(amz_date, auth.scope, expected_creq) == expected_sts

    # Both of the case's signatures verify with the derived key; a changed message does not.
    assert signature_matches(derived, auth.signature, expected_sts)
    assert signature_matches(derived, (case_dir / "header-signature.txt").read_text().strip(), expected_sts)
    assert not signature_matches(derived, auth.signature, flip_last_hex(expected_sts))
    query_sts = (case_dir / "query-string-to-sign.txt").read_text()
    assert signature_matches(derived, (case_dir / "query-signature.txt").read_text().strip(), query_sts)
    assert not signature_matches(derived, (case_dir / "query-signature.txt").read_text().strip(), expected_sts)


def test_corpus_was_found(testsuite_dir):
    assert len(corpus_cases()) >= 35  # 38 of the 40 cases ship a public key


def test_private_scalar_is_in_range_for_many_secrets():
    for i in range(50):
        d = private_scalar(f"AKID{i:04d}", f"secret-{i}")
        assert 1 <= d <= P256_ORDER - 1


@pytest.mark.parametrize("region_set, covered", [
    ("*", True), ("us-west-2", True), ("us-east-1,us-west-2", True), ("us-east-1, us-west-2", True),
    ("us-*", True), ("*-west-2", True), ("us-east-1", False), ("eu-*", False), ("us-west-20", False),
    ("us-west-?", False), ("us-west-[2]", False), ("", False), ("us-east-1,", False),
])
def test_region_set_coverage(region_set, covered):
    assert region_set_covers(region_set, SIM_REGION) is covered


# --- awscrt-signed requests ---

def crt_sign(method: str, target: str, headers: list[tuple[str, str]], *, region_set: str = "*",
             secret: str = SECRET_KEY, access_key: str = ACCESS_KEY, when=SIGNED_AT,
             double_encode: bool = True):
    """awscrt's SigV4A signer (not ours): -> a concurrent Future of the signed headers."""
    request = crt_http.HttpRequest(method, target, crt_http.HttpHeaders(headers))
    config = crt_auth.AwsSigningConfig(
        crt_auth.AwsSigningAlgorithm.V4_ASYMMETRIC, crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        crt_auth.AwsCredentialsProvider.new_static(access_key, secret, SESSION_TOKEN),
        region_set, SERVICE, date=when, use_double_uri_encode=double_encode,
        signed_body_value=crt_auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
    return crt_auth.aws_sign_request(request, config)


async def signed_headers(method: str, target: str, extra=(), **kw) -> list[tuple[str, str]]:
    future = crt_sign(method, target, [("host", HOST), *extra], **kw)
    signed = await asyncio.wait_for(asyncio.wrap_future(future), 10)
    return [(n, v) for n, v in signed.headers]


def replace(headers, name, new_value):
    return [(n, new_value if n.lower() == name else v) for n, v in headers]


@pytest.fixture
async def sim(tmp_path):
    server = await start_simulator(SimConfig(
        host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)), policy=None,
        region=SIM_REGION, service=SERVICE, clock=lambda: SIGNED_EPOCH + 30))
    yield server
    await server.aclose()


async def send_h1(port: int, method: str, target: str, headers) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte (no client library rewriting anything)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
        writer.write((head + "connection: close\r\n\r\n").encode("latin-1"))
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_head, _, body = raw.partition(b"\r\n\r\n")
    lines = status_head.decode("latin-1").split("\r\n")
    response_headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    assert "chunked" not in response_headers.get("transfer-encoding", ""), "simulator answers with a length"
    return int(lines[0].split(" ")[1]), response_headers, body


@pytest.mark.parametrize("region_set", ["*", "us-west-2", "us-east-1,us-west-2", "us-*"])
async def test_awscrt_signed_request_is_accepted(sim, region_set):
    target = "/orders/a%20b/../42?b=2&a=1&empty"
    headers = await signed_headers("GET", target, [("x-tenant", "t1")], region_set=region_set)
    status, response_headers, body = await send_h1(sim.port, "GET", target, headers)
    assert status == 200, body
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL
    assert "x-amz-region-set" in echo["signed_headers"] and "x-tenant" in echo["signed_headers"]
    assert dict(echo["headers"])["x-amz-region-set"] == region_set
    assert echo["path"] == "/orders/a%20b/../42" and echo["query"] == "b=2&a=1&empty"


async def test_awscrt_signed_post_with_body_is_accepted(sim):
    payload = b'{"id": 42}'
    extra = [("content-type", "application/json"), ("content-length", str(len(payload)))]
    headers = await signed_headers("POST", "/orders", extra)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        head = "POST /orders HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
        writer.write((head + "connection: close\r\n\r\n").encode() + payload)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    echo = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()


def _tamper_signature(headers):
    auth = next(v for n, v in headers if n.lower() == "authorization")
    prefix, _, signature = auth.rpartition("Signature=")
    # Change one byte of r (inside the DER), keeping the encoding well formed.
    i = 10
    flipped = signature[:i] + ("0" if signature[i] != "0" else "1") + signature[i + 1:]
    return replace(headers, "authorization", prefix + "Signature=" + flipped)


TAMPERINGS = {
    "path": lambda h: ("/orders/43", h),
    "query": lambda h: ("/orders/42?a=2", h),
    "signed header value": lambda h: ("/orders/42?a=1", replace(h, "x-tenant", "t2")),
    "region set widened after signing": lambda h: ("/orders/42?a=1", replace(h, "x-amz-region-set", "*")),
    "signature byte": lambda h: ("/orders/42?a=1", _tamper_signature(h)),
}


@pytest.mark.parametrize("what", sorted(TAMPERINGS))
async def test_tampered_request_is_refused(sim, what):
    headers = await signed_headers("GET", "/orders/42?a=1", [("x-tenant", "t1")], region_set="us-west-2")
    target, tampered = TAMPERINGS[what](headers)
    status, response_headers, body = await send_h1(sim.port, "GET", target, tampered)
    assert status == 403, body
    assert response_headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert b"does not match" in body
    signature = next(v for n, v in headers if n.lower() == "authorization").rpartition("=")[2]
    assert signature.encode() not in body and SECRET_KEY.encode() not in body


@pytest.mark.parametrize("region_set", ["us-east-1", "eu-*", "us-east-1,ap-southeast-2"])
async def test_region_set_excluding_the_simulator_is_refused(sim, region_set):
    headers = await signed_headers("GET", "/x", region_set=region_set)
    status, response_headers, body = await send_h1(sim.port, "GET", "/x", headers)
    assert status == 403, body
    assert response_headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert b"X-Amz-Region-Set" in body and SIM_REGION.encode() in body


async def test_wrong_secret_and_unknown_key_are_refused(sim):
    headers = await signed_headers("GET", "/x", secret=SECRET_KEY + "x")
    status, response_headers, _ = await send_h1(sim.port, "GET", "/x", headers)
    assert (status, response_headers["x-amzn-errortype"]) == (403, "InvalidSignatureException")
    headers = await signed_headers("GET", "/x", access_key="AKIDUNKNOWN000000000")
    status, response_headers, _ = await send_h1(sim.port, "GET", "/x", headers)
    assert (status, response_headers["x-amzn-errortype"]) == (403, "UnrecognizedClientException")


async def test_signature_outside_the_clock_skew_is_refused(sim):
    headers = await signed_headers("GET", "/x", when=SIGNED_AT - datetime.timedelta(minutes=10))
    status, response_headers, body = await send_h1(sim.port, "GET", "/x", headers)
    assert (status, response_headers["x-amzn-errortype"]) == (403, "InvalidSignatureException")
    assert b"Signature expired" in body


# --- malformed SigV4A headers (pure: verify_request without sockets) ---

def _ctx(double_encode_path: bool = True) -> VerifyContext:
    store = IdentityStore.from_document({"identities": [{
        "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, "session_token": SESSION_TOKEN,
        "principal": PRINCIPAL}]})
    return VerifyContext(store, SIM_REGION, SERVICE, SIGNED_EPOCH, double_encode_path)


def _good_headers() -> list[tuple[str, str]]:
    signed = crt_sign("GET", "/x", [("host", HOST)]).result(timeout=10)
    return [(n.lower(), v) for n, v in signed.headers]


def _with_auth(headers, transform):
    auth = next(v for n, v in headers if n == "authorization")
    return replace(headers, "authorization", transform(auth))


@pytest.mark.parametrize("transform, exception, fragment", [
    (lambda a: a.replace("SignedHeaders=host;", "SignedHeaders="), "IncompleteSignatureException", "'Host'"),
    (lambda a: a.replace(";x-amz-region-set", ""), "IncompleteSignatureException", "X-Amz-Region-Set"),
    (lambda a: a.replace("/vpc-lattice-svcs/", "/us-west-2/vpc-lattice-svcs/"), "IncompleteSignatureException", "4 slash"),
    (lambda a: a.replace("/vpc-lattice-svcs/", "/lambda/"), "InvalidSignatureException", "service"),
    (lambda a: a.replace("aws4_request", "aws5_request"), "InvalidSignatureException", "terminator"),
    (lambda a: a.rpartition("Signature=")[0] + "Signature=zz", "IncompleteSignatureException", "DER"),
    (lambda a: a.rpartition("Signature=")[0] + "Signature=" + "30" * 80, "IncompleteSignatureException", "DER"),
    (lambda a: a.rpartition("Signature=")[0] + "Signature=" + "ab" * 40, "InvalidSignatureException", "does not match"),
    (lambda a: a.rpartition(",")[0], "IncompleteSignatureException", "'Signature'"),
])
def test_malformed_v4a_authorization(transform, exception, fragment):
    with pytest.raises(AuthFailure) as info:
        headers = _with_auth(_good_headers(), transform)
        verify_request(RequestView("GET", "/x", "", headers), _ctx())
    assert info.value.exception == exception
    assert fragment in info.value.message
    assert SECRET_KEY not in str(info.value) and SESSION_TOKEN not in str(info.value)


@pytest.mark.parametrize("path, both", [("/plain/42", True), ("/a%20b/%C3%A9", False)])
def test_each_path_escaping_accepts_awscrts_v4a_signature_made_its_way(path, both):
    for double_encode in (True, False):
        signed = crt_sign("GET", path, [("host", HOST)], double_encode=double_encode).result(timeout=10)
        view = RequestView("GET", path, "", [(n.lower(), v) for n, v in signed.headers])
        assert verify_request(view, _ctx(double_encode)).identity.principal == PRINCIPAL
        if both:
            verify_request(view, _ctx(not double_encode))
        else:
            with pytest.raises(AuthFailure, match="does not match"):
                verify_request(view, _ctx(not double_encode))


def test_region_set_header_missing_but_signed():
    headers = [(n, v) for n, v in _good_headers() if n != "x-amz-region-set"]
    with pytest.raises(AuthFailure) as info:
        verify_request(RequestView("GET", "/x", "", headers), _ctx())
    assert info.value.exception == "IncompleteSignatureException"


def test_good_v4a_request_verifies_without_sockets_and_repr_hides_signature():
    headers = _good_headers()
    verified = verify_request(RequestView("GET", "/x", "", headers), _ctx())
    assert verified.identity.principal == PRINCIPAL
    assert verified.auth.scope == f"{SIGNED_AT:%Y%m%d}/{SERVICE}/aws4_request"
    signature = next(v for n, v in headers if n == "authorization").rpartition("=")[2]
    assert signature not in repr(verified.auth)


_SEGMENT = st.text("abcXYZ019-._~%20", min_size=1, max_size=8).filter(lambda s: "%" not in s.replace("%20", ""))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(_SEGMENT, min_size=0, max_size=4),
       query=st.lists(st.tuples(st.sampled_from(["a", "b", "A", "k%2F", "x"]),
                                st.sampled_from(["", "1", "a+b", "%E2%82%AC"])), max_size=4),
       tenant=st.text("abc 123\t", min_size=1, max_size=10).map(str.strip).filter(bool))
def test_awscrt_signatures_verify_for_varied_requests(segments, query, tenant):
    path = "/" + "/".join(segments)
    raw_query = "&".join(f"{k}={v}" for k, v in query)
    target = path + (f"?{raw_query}" if raw_query else "")
    signed = crt_sign("GET", target, [("host", HOST), ("x-tenant", tenant)]).result(timeout=10)
    headers = [(n.lower(), v) for n, v in signed.headers]
    verified = verify_request(RequestView("GET", path, raw_query, headers), _ctx())
    assert "x-tenant" in verified.auth.signed_headers
    with pytest.raises(AuthFailure):
        verify_request(RequestView("GET", path + "x", raw_query, headers), _ctx())
