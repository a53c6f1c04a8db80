"""Property tests: random requests signed by us, by botocore's SigV4Auth and by awscrt.

botocore is the oracle for paths (normalisation + double encoding) and headers (trimming,
repeats, ordering); it does not re-encode a query taken from a URL, so its queries are generated
already canonical (only the order and repeats vary). awscrt is the oracle for raw queries (escapes,
`+`, unicode, `=` in values, missing `=`, empty pairs) and for everything else as well.
The final `Authorization` values are compared.

Also here: the signer's contract (typed errors, the Lattice invariants, no secrets in reprs or
messages), checked against values written by hand from the SigV4 specification.
"""

from __future__ import annotations

import datetime
from unittest import mock
from urllib.parse import quote

import botocore.auth
import botocore.credentials
import pytest
from awscrt import auth as crt_auth
from awscrt import http as crt_http
from botocore.awsrequest import AWSRequest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sigv4proxy.errors import BadRequest, CredentialsUnavailable
from sigv4proxy.aws.signing import (EMPTY_SHA256, UNSIGNED_PAYLOAD, Credentials, SigV4Signer,
                                canonical_query, canonical_uri)

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE+token/with==padding"
NOW_DT = datetime.datetime(2015, 8, 30, 12, 36, 0, tzinfo=datetime.timezone.utc)
NOW = NOW_DT.timestamp()
SERVICE, REGION = "vpc-lattice-svcs", "us-west-2"
HOST = "svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"

PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---
UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
SUB_DELIMS = "!$&'()*+,;=:@"
escapes = st.sampled_from(["%20", "%2F", "%2f", "%25", "%41", "%7E", "%E1%88%B4", "%C3%A9", "%FF"])
unicode_chars = st.sampled_from(["é", "ሴ", "日本", "\u00a0x", "😀"])
path_piece = st.one_of(st.text(UNRESERVED + SUB_DELIMS + " ", min_size=1, max_size=6), escapes,
                       unicode_chars)
segment = st.one_of(st.just(""), st.just("."), st.just(".."),
                    st.lists(path_piece, min_size=1, max_size=3).map("".join))
paths = st.lists(segment, max_size=6).map(lambda segs: "/" + "/".join(segs))

query_piece = st.one_of(st.text(UNRESERVED + "!$'()*+,;:@/? ", max_size=5), escapes,
                        unicode_chars, st.just("="))
raw_queries = st.lists(
    st.tuples(st.lists(query_piece, max_size=3).map("".join),
              st.sampled_from(["=", ""]),
              st.lists(query_piece, max_size=3).map("".join)).map("".join),
    max_size=6).map("&".join)
canonical_pairs = st.lists(st.tuples(st.text(UNRESERVED + "é+ /", min_size=1, max_size=6),
                                     st.text(UNRESERVED + "é+ /=", max_size=6)), max_size=6)

header_names = st.sampled_from(["My-Header", "my-header", "X-Custom", "x-custom", "Content-Type",
                                "Accept", "x-b", "X-A"])
header_values = st.text("abcXYZ019-_.,;:/=\"' \t", max_size=12)
headers_lists = st.lists(st.tuples(header_names, header_values), max_size=6)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])


# --- the three signers ---
def ours(method: str, path: str, query: str, headers: list[tuple[str, str]],
         **options) -> str:
    extras = {name.lower() for name, _ in headers} - {"host"}
    signer = SigV4Signer(SERVICE, REGION, extra_signed_headers=extras, **options)
    added = signer.sign(method, path, query, headers, Credentials(ACCESS_KEY, SECRET_KEY, TOKEN),
                        NOW)
    return dict(added)["authorization"]


def botocore_authorization(method: str, path: str, query: str,
                           headers: list[tuple[str, str]]) -> str:
    url = f"https://{HOST}{path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url)
    for name, value in headers:
        request.headers[name] = value  # an HTTPMessage: assignment appends, repeats are kept
    request.context["payload_signing_enabled"] = False  # -> x-amz-content-sha256: UNSIGNED-PAYLOAD
    signer = botocore.auth.SigV4Auth(
        botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY, TOKEN), SERVICE, REGION)
    with mock.patch("botocore.auth.get_current_datetime",
                    return_value=NOW_DT.replace(tzinfo=None)):
        signer.add_auth(request)
    return request.headers["Authorization"]


def crt_authorization(method: str, path: str, query: str, headers: list[tuple[str, str]], *,
                      normalize: bool = True, double_encode: bool = True) -> str:
    target = path + (f"?{query}" if query else "")
    request = crt_http.HttpRequest(method, target, crt_http.HttpHeaders(headers))
    config = crt_auth.AwsSigningConfig(
        crt_auth.AwsSigningAlgorithm.V4, crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        crt_auth.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY, TOKEN),
        REGION, SERVICE, date=NOW_DT, use_double_uri_encode=double_encode,
        should_normalize_uri_path=normalize,
        signed_body_value=crt_auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
    signed = crt_auth.aws_sign_request(request, config).result(timeout=10)
    return signed.headers.get("authorization")


def with_host(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("Host", HOST), *headers]


# --- cross-checks ---
@PROPS
@given(method=methods, path=paths, headers=headers_lists)
def test_paths_and_headers_match_botocore(method, path, headers) -> None:
    headers = with_host(headers)
    assert ours(method, path, "", headers) == botocore_authorization(method, path, "", headers)


@PROPS
@given(pairs=canonical_pairs, order=st.randoms(use_true_random=False))
def test_unsorted_repeated_queries_match_botocore(pairs, order) -> None:
    encoded = [f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs]
    encoded += encoded[:2]  # repeated keys, and repeated identical pairs
    order.shuffle(encoded)
    query = "&".join(encoded)
    headers = with_host([])
    assert ours("GET", "/q", query, headers) == botocore_authorization("GET", "/q", query, headers)


@PROPS
@given(method=methods, path=paths, query=raw_queries, headers=headers_lists)
def test_raw_requests_match_awscrt(method, path, query, headers) -> None:
    # awscrt's URI parser rejects ":/" anywhere in the target (it looks for a scheme); botocore
    # covers such paths, and the canonical-query vectors cover such queries.
    assume(":/" not in path and ":/" not in query)
    headers = with_host(headers)
    assert ours(method, path, query, headers) == crt_authorization(method, path, query, headers)


@settings(max_examples=60, deadline=None)
@given(path=paths)
def test_s3_rule_matches_awscrt(path) -> None:
    # Single encoding, no normalisation: awscrt signs the wire path verbatim.
    assume(":/" not in path)
    headers = with_host([])
    assert ours("GET", path, "", headers, normalize_path=False, double_encode_path=False) == \
        crt_authorization("GET", path, "", headers, normalize=False, double_encode=False)


@settings(max_examples=100, deadline=None)
@given(method=methods, path=paths, query=raw_queries)
def test_single_encoding_matches_awscrt(method, path, query) -> None:
    # `--uri-path-escaping single`: normalised, not encoded again (plain paths take the fast path).
    assume(":/" not in path and ":/" not in query)
    headers = with_host([])
    assert ours(method, path, query, headers, double_encode_path=False) == \
        crt_authorization(method, path, query, headers, double_encode=False)


@settings(max_examples=80, deadline=None)
@given(query=raw_queries)
def test_canonical_query_is_idempotent(query) -> None:
    once = canonical_query(query)
    assert canonical_query(once) == once


# --- hand-written vectors (expected values from the SigV4 spec, not from our code) ---
@pytest.mark.parametrize("raw, expected", [
    ("/a%20b", "/a%2520b"),                          # an encoded path is encoded once more
    ("/%E1%88%B4", "/%25E1%2588%25B4"),
    ("/ሴ", "/%E1%88%B4"),
    ("/a b/c+d", "/a%20b/c%2Bd"),
    ("/a/./b/../../c//d/", "/c/d/"),                # dot and empty segments removed
    ("/..", "/"),
    ("/$x", "/%24x"),
])
def test_canonical_uri_default_rule(raw: str, expected: str) -> None:
    assert canonical_uri(raw, normalize=True, double_encode=True) == expected


def test_canonical_uri_s3_rule_keeps_the_wire_path() -> None:
    assert canonical_uri("//a/./%20b", normalize=False, double_encode=False) == "//a/./%20b"


@pytest.mark.parametrize("raw, expected", [
    ("b=2&a=1", "a=1&b=2"),
    ("a=2&a=1&a-b=0", "a=1&a=2&a-b=0"),             # by key, then value; "a" < "a-b"
    ("k=a+b", "k=a%2Bb"),                            # '+' is not a space
    ("k=%7e%2f%41", "k=~%2FA"),                      # decode, then re-encode canonically
    ("flag&x=", "flag=&x="),                         # a missing '=' is an empty value
    ("a=b=c", "a=b%3Dc"),
    ("a=1&&b=2&", "a=1&b=2"),                        # empty pairs dropped
    ("ሴ=bar", "%E1%88%B4=bar"),
    ("a=x:/y&b=?", "a=x%3A%2Fy&b=%3F"),             # gen-delims are encoded too
])
def test_canonical_query_vectors(raw: str, expected: str) -> None:
    assert canonical_query(raw) == expected


@pytest.mark.parametrize("query", ["a=%zz", "a=%", "a=%4"])
def test_malformed_query_escape_is_a_bad_request(query: str) -> None:
    with pytest.raises(BadRequest):
        canonical_query(query)


# --- the signer's contract ---
def lattice_signer(**options) -> SigV4Signer:
    return SigV4Signer(SERVICE, REGION, **options)


def creds(**overrides) -> Credentials:
    return Credentials(**{"access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "token": TOKEN,
                          **overrides})


def test_lattice_request_headers_and_signed_set() -> None:
    headers = [("Host", HOST), ("User-Agent", "curl/8"), ("X-Forwarded-For", "10.0.0.1"),
               ("X-Amzn-Trace-Id", "Root=1"), ("Connection", "keep-alive"), ("Accept", "*/*")]
    added = lattice_signer().sign("GET", "/items", "a=1&b=two", headers, creds(), NOW)
    assert [name for name, _ in added] == ["x-amz-date", "x-amz-content-sha256",
                                           "x-amz-security-token", "authorization"]
    values = dict(added)
    assert values["x-amz-date"] == "20150830T123600Z"
    assert values["x-amz-content-sha256"] == UNSIGNED_PAYLOAD
    assert values["x-amz-security-token"] == TOKEN
    assert values["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20150830/{REGION}/{SERVICE}/aws4_request, "
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature=")
    assert values["authorization"] == botocore_authorization("GET", "/items", "a=1&b=two",
                                                             headers[:1])


def test_extra_headers_signed_only_when_present() -> None:
    signer = lattice_signer(extra_signed_headers=["Content-Type", "x-tenant"])
    base = [("host", HOST)]
    without = signer.explain("GET", "/", "", base, creds(), NOW)
    assert without.signed_headers == "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
    with_ct = signer.explain("GET", "/", "", base + [("Content-Type", "a/b")], creds(), NOW)
    assert with_ct.signed_headers.startswith("content-type;host;")


@pytest.mark.parametrize("name", ["user-agent", "Connection", "x-forwarded-for", "X-Amzn-Trace-Id",
                                  "transfer-encoding", ":authority"])
def test_forbidden_extra_headers_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="never be signed"):
        lattice_signer(extra_signed_headers=[name])


def test_lattice_refuses_payload_signing() -> None:
    with pytest.raises(ValueError):
        lattice_signer(unsigned_payload=False)
    with pytest.raises(ValueError):
        lattice_signer().sign("PUT", "/", "", [("host", HOST)], creds(), NOW,
                              payload_hash="ab" * 32)


def test_payload_hash_for_other_services() -> None:
    signer = SigV4Signer("execute-api", REGION)
    body_hash = "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
    assert dict(signer.sign("POST", "/", "", [("host", HOST)], creds(), NOW,
                            payload_hash=body_hash))["x-amz-content-sha256"] == body_hash
    assert dict(signer.sign("GET", "/", "", [("host", HOST)], creds(), NOW))[
        "x-amz-content-sha256"] == EMPTY_SHA256


@pytest.mark.parametrize("headers, reason", [
    ([("Accept", "*/*")], "no host"),
    ([("host", HOST), ("Host", HOST)], "more than one host"),
    ([("host", HOST), ("X-Amz-Date", "20150830T123600Z")], "x-amz-date"),
    ([("host", HOST), ("Authorization", "AWS4-HMAC-SHA256 stale")], "authorization"),
    ([("host", HOST), ("x-amz-security-token", "stale")], "x-amz-security-token"),
])
def test_bad_requests_are_typed(headers, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason) as info:
        lattice_signer().sign("GET", "/", "", headers, creds(), NOW)
    assert info.value.status == 400
    assert "stale" not in str(info.value)  # header values never reach messages


@pytest.mark.parametrize("path", ["", "items", "http://x/", "/a?b", "*"])
def test_non_origin_form_path_is_a_bad_request(path: str) -> None:
    with pytest.raises(BadRequest):
        lattice_signer().sign("GET", path, "", [("host", HOST)], creds(), NOW)


def test_expired_credentials_fail_closed() -> None:
    with pytest.raises(CredentialsUnavailable):
        lattice_signer().sign("GET", "/", "", [("host", HOST)], creds(expiry=NOW), NOW)
    assert lattice_signer().sign("GET", "/", "", [("host", HOST)], creds(expiry=NOW + 1), NOW)


def test_no_token_means_no_token_header() -> None:
    added = dict(lattice_signer().sign("GET", "/", "", [("host", HOST)], creds(token=None), NOW))
    assert "x-amz-security-token" not in added
    assert "x-amz-security-token" not in added["authorization"]


def test_date_changes_with_now_and_key_rolls_over_midnight() -> None:
    signer = lattice_signer()
    before = dict(signer.sign("GET", "/", "", [("host", HOST)], creds(), 1440979199.0))
    after = dict(signer.sign("GET", "/", "", [("host", HOST)], creds(), 1440979200.0))
    assert before["x-amz-date"] == "20150830T235959Z"
    assert after["x-amz-date"] == "20150831T000000Z"
    assert "/20150831/" in after["authorization"]
    # and the cached key for the new day is right: botocore agrees at that instant
    with mock.patch("botocore.auth.get_current_datetime",
                    return_value=datetime.datetime(2015, 8, 31, 0, 0, 0)):
        request = AWSRequest(method="GET", url=f"https://{HOST}/")
        request.context["payload_signing_enabled"] = False
        botocore.auth.SigV4Auth(botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY, TOKEN),
                                SERVICE, REGION).add_auth(request)
    assert after["authorization"] == request.headers["Authorization"]


def test_rotated_secret_gets_a_new_key() -> None:
    signer = lattice_signer()
    first = dict(signer.sign("GET", "/", "", [("host", HOST)], creds(), NOW))["authorization"]
    rotated = dict(signer.sign("GET", "/", "", [("host", HOST)],
                               creds(secret_key=SECRET_KEY[::-1]), NOW))["authorization"]
    assert first != rotated
    again = dict(signer.sign("GET", "/", "", [("host", HOST)], creds(), NOW))["authorization"]
    assert again == first


def test_secrets_stay_out_of_reprs_and_explain_text() -> None:
    credentials = creds()
    details = lattice_signer().explain("GET", "/", "", [("host", HOST)], credentials, NOW)
    for text in (repr(credentials), repr(details), details.describe(), repr(lattice_signer())):
        assert SECRET_KEY not in text
        assert TOKEN not in text
    assert TOKEN in details.canonical_request  # the exact text is still there for tooling
    assert "<redacted session token>" in details.describe()
