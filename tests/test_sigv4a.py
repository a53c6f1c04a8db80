"""SigV4A conformance: every case of aws-c-auth's `v4a/` suite, plus awscrt agreement.

ECDSA signatures are randomised, so per case we check the canonical request and the string to
sign exactly, verify OUR signature with the case's public key, check the suite's own signature
verifies the same way (so the verification itself is sound), and check that the public key we
derive from the credentials is the case's. Query-string presigning is not implemented (headers
only), so the `query-*` files are not used. Both path escapings run every case, as in
test_signing_corpus (whose docstring says how single-encoding expectations come from these
double-encoding vectors); here our signature is verified against the derived string to sign.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import json
import time

import pytest
from awscrt import auth as crt_auth
from awscrt import http as crt_http
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TESTSUITE, corpus_params
from sigv4proxy.errors import BadRequest
from sigv4proxy.aws.signing import Credentials
from sigv4proxy.aws.sigv4a import SigV4ASigner, derive_ecdsa_key
from test_signing_corpus import (ESCAPINGS, authorization_from_signed_request, extras_for,
                                 parse_raw_request, single_encoding_vector, split_own_headers)

V4A_DIR = TESTSUITE / "aws-c-auth-aws-signing-test-suite" / "v4a"
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


# Two cases ship only request.txt and context.json (no expected files, no public key): their
# canonical query is checked against the rule, written by hand (byte order: "V" < "v").
INCOMPLETE_CASES = {"get-vanilla-query-order-key": "Param1=Value1&Param1=value2",
                    "get-vanilla-query-order-value": "Param1=value1&Param1=value2"}


def all_v4a_dirs() -> list:
    return sorted(p for p in V4A_DIR.iterdir() if p.is_dir()) if V4A_DIR.is_dir() else []


def v4a_cases() -> list[str]:
    return [p.name for p in all_v4a_dirs() if (p / "header-canonical-request.txt").is_file()]


def load_case(case_dir, escaping: str = "double"):
    ctx = json.loads((case_dir / "context.json").read_text())
    method, path, query, headers, body = parse_raw_request((case_dir / "request.txt").read_text())
    headers, own = split_own_headers(headers)
    assert not own
    token = None if ctx.get("omit_session_token") else ctx["credentials"].get("token")
    creds = Credentials(ctx["credentials"]["access_key_id"],
                        ctx["credentials"]["secret_access_key"], token)
    signer = SigV4ASigner(ctx["service"], ctx["region"], extra_signed_headers=extras_for(headers),
                          unsigned_payload=False, normalize_path=ctx["normalize"],
                          double_encode_path=escaping == "double",
                          content_sha256_header=ctx["sign_body"])
    now = float(calendar.timegm(time.strptime(ctx["timestamp"], "%Y-%m-%dT%H:%M:%SZ")))
    args = (method, path, query, headers, creds, now, hashlib.sha256(body).hexdigest())
    return ctx, signer, args


def public_key_of_case(case_dir) -> ec.EllipticCurvePublicKey:
    xy = json.loads((case_dir / "public-key.json").read_text())
    return ec.EllipticCurvePublicNumbers(int(xy["X"], 16), int(xy["Y"], 16),
                                         ec.SECP256R1()).public_key()


def verifies(public_key: ec.EllipticCurvePublicKey, signature_hex: str, message: str) -> bool:
    try:
        public_key.verify(bytes.fromhex(signature_hex), message.encode(), ECDSA_SHA256)
        return True
    except InvalidSignature:
        return False


@pytest.mark.parametrize("escaping", ESCAPINGS)
@pytest.mark.parametrize("case", corpus_params(v4a_cases()))
def test_aws_c_auth_v4a_case(testsuite_dir, case: str, escaping: str) -> None:
    case_dir = testsuite_dir / "aws-c-auth-aws-signing-test-suite" / "v4a" / case
    ctx, signer, args = load_case(case_dir, escaping)
    creds = args[4]
    vector_sts = expected_sts = (case_dir / "header-string-to-sign.txt").read_text()
    expected_creq = (case_dir / "header-canonical-request.txt").read_text()
    if escaping == "single":
        expected_creq, expected_sts = single_encoding_vector(args[1], expected_creq, expected_sts) \
            or (expected_creq, expected_sts)
    public_key = public_key_of_case(case_dir)

    details = signer.explain(*args)
    assert details.canonical_request == expected_creq
    assert details.string_to_sign == expected_sts

    # The derived key is the case's key.
    derived = derive_ecdsa_key(creds.access_key, creds.secret_key).public_key().public_numbers()
    assert derived == public_key.public_numbers()

    # The suite's signature verifies against its string to sign (sanity of the method)...
    assert verifies(public_key, (case_dir / "header-signature.txt").read_text().strip(),
                    vector_sts)
    # ...and so does ours; with a flipped byte of the message it must not.
    added = dict(signer.sign(*args))
    authorization = added["authorization"]
    prefix, _, signature = authorization.rpartition("Signature=")
    expected_prefix = authorization_from_signed_request(
        (case_dir / "header-signed-request.txt").read_text()).rpartition("Signature=")[0]
    assert prefix == expected_prefix
    assert verifies(public_key, signature, expected_sts)
    assert not verifies(public_key, signature, expected_sts[:-1] + "0"
                        if not expected_sts.endswith("0") else expected_sts[:-1] + "1")
    assert added["x-amz-region-set"] == ctx["region"]


@pytest.mark.parametrize("case", sorted(INCOMPLETE_CASES))
def test_aws_c_auth_v4a_case_without_expected_files(testsuite_dir, case: str) -> None:
    case_dir = testsuite_dir / "aws-c-auth-aws-signing-test-suite" / "v4a" / case
    _, signer, args = load_case(case_dir)
    details = signer.explain(*args)
    assert details.canonical_request.split("\n")[2] == INCOMPLETE_CASES[case]
    creds = args[4]
    public_key = derive_ecdsa_key(creds.access_key, creds.secret_key).public_key()
    signature = dict(signer.sign(*args))["authorization"].rpartition("Signature=")[2]
    assert verifies(public_key, signature, details.string_to_sign)


def test_v4a_corpus_is_present(testsuite_dir) -> None:  # skips with a reason when the suite is absent
    dirs = all_v4a_dirs()
    assert len(dirs) == 40
    assert {p.name for p in dirs} - set(v4a_cases()) == set(INCOMPLETE_CASES)


def test_signatures_are_randomised_and_both_verify() -> None:
    signer = SigV4ASigner("vpc-lattice-svcs")
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token")
    args = ("GET", "/x", "a=1", [("host", "example.com")], creds, 1440938160.0)
    first, second = dict(signer.sign(*args)), dict(signer.sign(*args))
    assert first["authorization"] != second["authorization"]
    sts = signer.explain(*args).string_to_sign
    public_key = derive_ecdsa_key(creds.access_key, creds.secret_key).public_key()
    for added in (first, second):
        assert verifies(public_key, added["authorization"].rpartition("Signature=")[2], sts)
        assert added["x-amz-region-set"] == "*"
        assert added["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert "/20150830/vpc-lattice-svcs/aws4_request," in first["authorization"]
    assert "host;x-amz-content-sha256;x-amz-date;x-amz-region-set;x-amz-security-token" in \
        first["authorization"]


def test_region_set_header_in_request_is_refused() -> None:
    signer = SigV4ASigner("vpc-lattice-svcs")
    with pytest.raises(BadRequest, match="x-amz-region-set"):
        signer.sign("GET", "/", "", [("host", "h"), ("X-Amz-Region-Set", "*")],
                    Credentials("AK", "SK"), 0.0)


def test_repr_has_no_secret() -> None:
    signer = SigV4ASigner("svc", "us-east-1,us-west-2")
    signer.sign("GET", "/", "", [("host", "h")], Credentials("AK", "SECRETKEY"), 0.0)
    assert "SECRETKEY" not in repr(signer)


@settings(max_examples=15, deadline=None)
@given(access_key=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=16, max_size=20),
       secret_key=st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789+/", min_size=40,
                          max_size=40),
       path=st.sampled_from(["/", "/a%20b/../c", "/items/42"]),
       query=st.sampled_from(["", "b=2&a=1", "k=a+b&flag"]))
def test_awscrt_v4a_signature_verifies_with_our_key_and_canonicalisation(
        access_key, secret_key, path, query) -> None:
    # awscrt derives its own key and builds its own string to sign: if its signature verifies
    # with OUR derived public key over OUR string to sign, both KDF and canonicalisation agree.
    when = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
    headers = [("host", "svc.example.on.aws"), ("x-tenant", "t1")]
    request = crt_http.HttpRequest("GET", path + (f"?{query}" if query else ""),
                                   crt_http.HttpHeaders(headers))
    config = crt_auth.AwsSigningConfig(
        crt_auth.AwsSigningAlgorithm.V4_ASYMMETRIC, crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        crt_auth.AwsCredentialsProvider.new_static(access_key, secret_key, "tok"),
        "*", "vpc-lattice-svcs", date=when,
        signed_body_value=crt_auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
    signed = crt_auth.aws_sign_request(request, config).result(timeout=10)
    crt_signature = signed.headers.get("authorization").rpartition("Signature=")[2]

    signer = SigV4ASigner("vpc-lattice-svcs", extra_signed_headers=["x-tenant"])
    sts = signer.explain("GET", path, query, headers, Credentials(access_key, secret_key, "tok"),
                         when.timestamp()).string_to_sign
    public_key = derive_ecdsa_key(access_key, secret_key).public_key()
    assert verifies(public_key, crt_signature, sts)
