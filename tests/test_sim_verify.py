"""The simulator's SigV4 verifier, checked against signers it shares no code with: the public AWS
test suite (aws-c-auth vectors), botocore's SigV4Auth and awscrt's aws_sign_request."""

from __future__ import annotations

import datetime
import hashlib
import json
import time

import pytest
from awscrt import auth as crt_auth
from awscrt import http as crt_http
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from sigv4proxy.sim.identities import IdentityStore
from sigv4proxy.sim.verify import (
    AuthFailure, RequestView, VerifyContext, canonical_query, canonical_request, canonical_uri,
    compute_signature, parse_authorization, verify_request,
)

HOST = "svc-0123.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
AK, SK, TOKEN = "AKIDSIMVERIFY0000001", "sim-verify-secret-0123456789abcdefghijkl", "sim-verify-token-xyz"
STORE = IdentityStore.load({"identities": [
    {"access_key_id": AK, "secret_access_key": SK, "session_token": TOKEN,
     "principal": "arn:aws:sts::111122223333:assumed-role/app/s1"},
    {"access_key_id": "AKIDNOTOKEN000000001", "secret_access_key": SK,
     "principal": "arn:aws:iam::111122223333:user/plain"},
]})


def ctx(now: float | None = None, region: str = "us-west-2", service: str = "vpc-lattice-svcs",
        double_encode_path: bool = True) -> VerifyContext:
    return VerifyContext(STORE, region, service, time.time() if now is None else now, double_encode_path)


# --- the public AWS test suite ---

def _parse_http(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    lines = text.split("\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rsplit(" ", 1)[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line == "":
            break
        if line[0] in " \t":  # obsolete line folding: a continuation of the previous value
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
            continue
        name, _, value = line.partition(":")
        headers.append((name.lower(), value))
    return method, target, headers


def _suite_cases(testsuite_dir):
    v4 = testsuite_dir / "aws-c-auth-aws-signing-test-suite" / "v4"
    cases = []
    for case in sorted(p for p in v4.iterdir() if p.is_dir()):
        context = json.loads((case / "context.json").read_text())
        # Lattice always normalizes paths; the "-unnormalized" vectors model S3-style signing.
        if context.get("normalize", True):
            cases.append(case)
    return cases


def test_aws_testsuite_canonical_requests_and_signatures(testsuite_dir):
    cases = _suite_cases(testsuite_dir)
    assert len(cases) >= 25
    for case in cases:
        context = json.loads((case / "context.json").read_text())
        method, target, headers = _parse_http((case / "header-signed-request.txt").read_text())
        auth_value = next(v for n, v in headers if n == "authorization")
        headers = [(n, v) for n, v in headers if n != "authorization"]
        auth = parse_authorization(auth_value)
        path, _, query = target.partition("?")
        expected_creq = (case / "header-canonical-request.txt").read_text()
        payload_hash = expected_creq.rsplit("\n", 1)[1]  # an input to signing, not an output
        creq = canonical_request(RequestView(method, path, query, headers), auth.signed_headers,
                                 auth.signed_headers_raw, payload_hash)
        assert creq == expected_creq, case.name
        amz_date = next(v for n, v in headers if n == "x-amz-date")
        sig = compute_signature(context["credentials"]["secret_access_key"], auth, amz_date, creq)
        assert sig == (case / "header-signature.txt").read_text().strip(), case.name
        assert sig == auth.signature


# --- canonicalization rules, expected values written from the spec by hand ---

@pytest.mark.parametrize("raw, expected", [
    ("/a%20b", "/a%2520b"),
    ("/", "/"),
    ("", "/"),
    ("//a//b//", "/a/b/"),
    ("/a/./b/../c", "/a/c"),
    ("/../../x", "/x"),
    ("/ümlaut", "/%C3%BCmlaut"),
    ("/a+b=c:d@e", "/a%2Bb%3Dc%3Ad%40e"),
    ("/~user/-_.", "/~user/-_."),
])
def test_canonical_uri(raw, expected):
    assert canonical_uri(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("/a%20b", "/a%20b"),
    ("/a%2Fb/%C3%A9", "/a%2Fb/%C3%A9"),
    ("//a/./b/../%2520/", "/a/%2520/"),  # dot and empty segments still go
])
def test_canonical_uri_single_encoding_keeps_the_path_as_it_arrived(raw, expected):
    assert canonical_uri(raw, double_encode=False) == expected


@pytest.mark.parametrize("raw, expected", [
    ("", ""),
    ("b=2&a=1", "a=1&b=2"),
    ("a=2&a=1&a=10", "a=1&a=10&a=2"),
    ("flag", "flag="),
    ("flag&x=", "flag=&x="),
    ("a=%7e%41", "a=~A"),
    ("a=b+c", "a=b%2Bc"),
    ("a=x y", "a=x%20y"),
    ("k%3D=v%26w", "k%3D=v%26w"),
    ("&&a=1&", "a=1"),
    ("B=1&a=1", "B=1&a=1"),  # byte order: uppercase sorts first
    ("q=%E2%82%AC", "q=%E2%82%AC"),
])
def test_canonical_query(raw, expected):
    assert canonical_query(raw) == expected


# --- agreement with botocore (canonical queries only: botocore does not re-encode) ---

def botocore_sign(method, target, headers=(), *, key=AK, token=TOKEN, region="us-west-2",
                  service="vpc-lattice-svcs", content_sha: str | None = "UNSIGNED-PAYLOAD"):
    hdrs = {"Host": HOST, **dict(headers)}
    if content_sha is not None:
        hdrs["X-Amz-Content-SHA256"] = content_sha
    req = AWSRequest(method=method, url=f"https://{HOST}{target}", headers=hdrs)
    SigV4Auth(Credentials(key, SK, token), service, region).add_auth(req)
    path, _, query = target.partition("?")
    return RequestView(method, path, query, [(n.lower(), v) for n, v in req.headers.items()])


# Path pieces as they appear on the wire: unreserved, sub-delims and already-encoded octets.
piece = st.sampled_from(["a", "Z", "0", "-", "_", ".", "~", "%20", "%C3%A9", "%2F", ":", "@", "!", "$", "'",
                         "(", ")", "*", ",", ";", "=", "+"])
segment = st.lists(piece, min_size=1, max_size=4).map("".join)
qtoken = st.text(alphabet=st.sampled_from("abcXYZ019-_.~"), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       segments=st.lists(segment, max_size=4), trailing=st.booleans(),
       query=st.lists(st.tuples(qtoken, qtoken), max_size=4),
       extra=st.dictionaries(st.sampled_from(["x-a", "x-b", "content-type"]), st.text("ab c;", min_size=1, max_size=8)))
def test_botocore_signed_requests_verify(method, segments, trailing, query, extra):
    path = "/" + "/".join(segments) + ("/" if trailing and segments else "")
    target = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    view = botocore_sign(method, target, extra.items())
    verified = verify_request(view, ctx())
    assert verified.identity.access_key_id == AK


# --- agreement with awscrt, including queries that need re-encoding ---

def crt_sign(method, target, headers=(), token=TOKEN, double_encode: bool = True) -> RequestView:
    creds = crt_auth.AwsCredentialsProvider.new_static(AK, SK, token)
    cfg = crt_auth.AwsSigningConfig(
        algorithm=crt_auth.AwsSigningAlgorithm.V4, signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        credentials_provider=creds, region="us-west-2", service="vpc-lattice-svcs",
        date=datetime.datetime.now(datetime.timezone.utc), use_double_uri_encode=double_encode,
        signed_body_value=crt_auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
    req = crt_http.HttpRequest(method, target, crt_http.HttpHeaders([("host", HOST), *headers]))
    signed = crt_auth.aws_sign_request(req, cfg).result(10)
    path, _, query = target.partition("?")
    return RequestView(method, path, query, [(n.lower(), v) for n, v in signed.headers])


@pytest.mark.parametrize("target", [
    "/plain",
    "/a%20b/c",
    "/x?b=2&a=1&a=0",
    "/x?empty&k=",
    "/x?sp=a%20b&tilde=~&star=*",
    "/x?Z=1&a=1&%41=3",
    "/x?utf=%E2%82%AC&s=%2F",
    "/x/./y/../z//w",
])
def test_awscrt_signed_requests_verify(target):
    view = crt_sign("GET", target, [("x-multi", "one"), ("x-multi", " two  three ")])
    assert verify_request(view, ctx()).identity.access_key_id == AK


@pytest.mark.parametrize("target, both", [
    ("/plain/x?a=1", True),
    ("/x/./y/../z//w", True),
    ("/a%20b", False),
    ("/a%2Fb", False),
    ("/a%2520b", False),
    ("/caf%C3%A9", False),
])
def test_each_path_escaping_accepts_its_own_signature_and_refuses_the_other(target, both):
    # awscrt signs both ways; botocore's SigV4Auth double-encodes. A verifier set the other way
    # refuses exactly the paths whose two canonical URIs differ, with Lattice's mismatch error.
    for double_encode in (True, False):
        signed = [crt_sign("GET", target, double_encode=double_encode)]
        if double_encode:
            signed.append(botocore_sign("GET", target))
        for view in signed:
            assert verify_request(view, ctx(double_encode_path=double_encode)).identity.access_key_id == AK
            if both:
                verify_request(view, ctx(double_encode_path=not double_encode))
            else:
                _expect(view, "InvalidSignatureException", "does not match",
                        ctx(double_encode_path=not double_encode))


# --- rejections, each with the exception Lattice names ---

def _expect(view: RequestView, exception: str, fragment: str, context: VerifyContext | None = None) -> None:
    with pytest.raises(AuthFailure) as info:
        verify_request(view, context or ctx())
    assert info.value.exception == exception
    assert fragment in info.value.message
    for secret in (SK, TOKEN):
        assert secret not in str(info.value)


def _replace(view: RequestView, name: str, value: str | None) -> RequestView:
    headers = [(n, v) for n, v in view.headers if n != name]
    if value is not None:
        headers.append((name, value))
    return RequestView(view.method, view.raw_path, view.raw_query, headers)


def test_tampering_is_detected():
    good = botocore_sign("GET", "/p?a=1", {"x-signed": "v"}.items())
    verify_request(good, ctx())
    mismatch = "The request signature we calculated does not match"
    _expect(RequestView("GET", "/q", good.raw_query, good.headers), "InvalidSignatureException", mismatch)
    _expect(RequestView("GET", good.raw_path, "a=2", good.headers), "InvalidSignatureException", mismatch)
    _expect(RequestView("POST", good.raw_path, good.raw_query, good.headers), "InvalidSignatureException", mismatch)
    _expect(_replace(good, "x-signed", "w"), "InvalidSignatureException", mismatch)
    _expect(_replace(good, "x-signed", None), "IncompleteSignatureException", "'x-signed' is named as a SignedHeader")


def test_scope_time_payload_and_credentials_are_checked():
    now = time.time()
    view = botocore_sign("GET", "/p")
    _expect(view, "InvalidSignatureException", "Signature expired", ctx(now + 301))
    _expect(view, "InvalidSignatureException", "Signature not yet current", ctx(now - 301))
    verify_request(view, ctx(now + 200))  # within the 5-minute window
    _expect(botocore_sign("GET", "/p", service="execute-api"), "InvalidSignatureException", "correct service")
    _expect(botocore_sign("GET", "/p", region="us-east-1"), "InvalidSignatureException", "region")
    signed_payload = hashlib.sha256(b"body").hexdigest()
    _expect(botocore_sign("PUT", "/p", content_sha=signed_payload), "InvalidSignatureException",
            "Signed payloads are not supported")
    _expect(botocore_sign("GET", "/p", content_sha=None), "IncompleteSignatureException", "x-amz-content-sha256")
    _expect(botocore_sign("GET", "/p", key="AKIDUNKNOWN000000001"), "UnrecognizedClientException", "security token")
    _expect(botocore_sign("GET", "/p", token="wrong-token"), "UnrecognizedClientException", "security token")
    _expect(_replace(view, "x-amz-security-token", None), "UnrecognizedClientException", "security token")
    # An identity without a token must not present one; and one that has none verifies without.
    verify_request(botocore_sign("GET", "/p", key="AKIDNOTOKEN000000001", token=None), ctx())
    _expect(botocore_sign("GET", "/p", key="AKIDNOTOKEN000000001", token="x"), "UnrecognizedClientException", "token")


@pytest.mark.parametrize("auth_value, exception, fragment", [
    (None, "AccessDeniedException", "not signed"),
    ("AWS4-HMAC-SHA256 SignedHeaders=host, Signature=" + "0" * 64, "IncompleteSignatureException", "Credential"),
    ("AWS4-HMAC-SHA256 Credential=a/b/c, SignedHeaders=host, Signature=" + "0" * 64,
     "IncompleteSignatureException", "5 slash"),
    ("AWS4-HMAC-SHA256 Credential=a/b/c/d/e, SignedHeaders=host, Signature=short", "IncompleteSignatureException", "64"),
    ("AWS4-HMAC-SHA1 Credential=a/b/c/d/e", "IncompleteSignatureException", "algorithm"),
    ("AWS4-ECDSA-P256-SHA256 Credential=a/b/c/d/e", "IncompleteSignatureException", "SigV4A"),
])
def test_malformed_authorization(auth_value, exception, fragment):
    good = botocore_sign("GET", "/p")
    _expect(_replace(good, "authorization", auth_value), exception, fragment)


def test_host_must_be_signed():
    good = botocore_sign("GET", "/p")
    auth = next(v for n, v in good.headers if n == "authorization").replace("SignedHeaders=host;", "SignedHeaders=")
    _expect(_replace(good, "authorization", auth), "IncompleteSignatureException", "'Host'")


def test_reprs_hide_secrets():
    ident = STORE.get(AK)
    assert SK not in repr(ident) and TOKEN not in repr(ident) and SK not in repr(STORE)
    view = botocore_sign("GET", "/p")
    auth = parse_authorization(next(v for n, v in view.headers if n == "authorization"))
    assert auth.signature not in repr(auth)
