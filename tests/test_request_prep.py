"""Request hygiene, routing and signing (`request_prep.RequestPreparer`), no sockets needed.

The signature is checked against botocore's SigV4Auth, given only what was forwarded: the Host
the proxy signs for and the forwarded headers it was configured to sign.
"""

from __future__ import annotations

import datetime
from unittest import mock

import botocore.auth
import botocore.credentials
import pytest
from botocore.awsrequest import AWSRequest

from sigv4proxy.config import from_sources
from sigv4proxy.aws.credentials import CredentialStore
from sigv4proxy.errors import BadRequest, MethodNotSupported, PayloadTooLarge
from sigv4proxy.exchange.prepare import HeaderRules, RequestPreparer
from sigv4proxy.aws.routing import Router

HOST = "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
NOW = 1_700_000_000.0
ACCESS_KEY, SECRET_KEY, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok/en+1="


def preparer(config: dict | None = None, **kw) -> RequestPreparer:
    settings = from_sources({"region": "us-west-2", **(config or {})}, env={})
    store = CredentialStore.static(ACCESS_KEY, SECRET_KEY, TOKEN)
    return RequestPreparer(Router(settings), store, HeaderRules(**kw), clock=lambda: NOW)


def botocore_authorization(method: str, target: str, signed: list[tuple[str, str]]) -> str:
    request = AWSRequest(method=method, url=f"https://{HOST}{target}")
    request.headers["Host"] = HOST
    for name, value in signed:
        request.headers[name] = value  # assignment appends: repeats are kept, as sent
    request.context["payload_signing_enabled"] = False  # x-amz-content-sha256: UNSIGNED-PAYLOAD
    signer = botocore.auth.SigV4Auth(
        botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY, TOKEN), "vpc-lattice-svcs",
        "us-west-2")
    now = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        signer.add_auth(request)
    return request.headers["Authorization"]


def test_forwarded_headers_and_signature_match_botocore():
    raw = [(b"Host", HOST.encode()), (b"X-Tenant", b"t-42"), (b"Content-Type", b"application/json"),
           (b"x-tenant", b"t-43"), (b"Accept", b"*/*"), (b"Authorization", b"Bearer forged"),
           (b"X-Amz-Date", b"19990101T000000Z"), (b"Connection", b"keep-alive, X-Hop"),
           (b"X-Hop", b"gone"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
           (b"Expect", b"100-continue")]
    prep = preparer({"extra_signed_headers": ["x-tenant", "content-type"]})
    prepared = prep.prepare("POST", None, "/orders/1?b=2&a=1", raw, 10)
    assert prepared.route.authority == HOST and prepared.expect_continue
    ours = [(n.decode(), v.decode()) for n, v in prepared.headers]
    forwarded = ours[:5]
    assert forwarded == [("x-tenant", "t-42"), ("content-type", "application/json"),
                         ("x-tenant", "t-43"), ("accept", "*/*"),
                         ("expect", "100-continue")]  # the upstream may refuse before the body
    added = dict(ours[5:])
    assert list(added) == ["x-amz-date", "x-amz-content-sha256", "x-amz-security-token",
                           "authorization"]
    assert added["x-amz-date"] == "20231114T221320Z" and added["x-amz-security-token"] == TOKEN
    signed = [(n, v) for n, v in forwarded if n in ("x-tenant", "content-type")]
    assert added["authorization"] == botocore_authorization("POST", "/orders/1?b=2&a=1", signed)
    assert "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token;" \
           "x-tenant," in added["authorization"]


def test_unsigned_headers_do_not_change_the_signature():
    prep = preparer()
    plain = prep.prepare("GET", None, "/a", [(b"Host", HOST.encode())], None)
    busy = prep.prepare("GET", None, "/a", [(b"host", HOST.encode()), (b"User-Agent", b"x"),
                                            (b"X-Anything", b"\xe9t\xe9")], None)
    assert dict(plain.headers)[b"authorization"] == dict(busy.headers)[b"authorization"]
    assert busy.headers[:2] == [(b"user-agent", b"x"), (b"x-anything", b"\xe9t\xe9")]  # bytes as sent
    assert dict(plain.headers)[b"authorization"].decode() == botocore_authorization("GET", "/a", [])


def test_header_options_apply_in_order():
    prep = preparer(strip_headers=("X-Secret",), add_headers=(("X-Team", " pay "),),
                    duplicate_headers=("Authorization",))
    prepared = prep.prepare("GET", None, "/", [
        (b"Host", HOST.encode()), (b"Authorization", b"Bearer app"), (b"X-SECRET", b"s"),
        (b"X-Keep", b"1")], None)
    names = [(n, v) for n, v in prepared.headers if not n.startswith((b"x-amz-", b"authorization"))]
    assert names == [(b"x-original-authorization", b"Bearer app"), (b"x-keep", b"1"),
                     (b"x-team", b"pay")]


def test_te_trailers_kept_only_when_asked():
    raw = [(b"host", HOST.encode()), (b"te", b"trailers")]
    assert (b"te", b"trailers") not in preparer().prepare("POST", None, "/", raw, None).headers
    kept = preparer().prepare("POST", None, "/", raw, None, from_h2=True).headers
    assert (b"te", b"trailers") in kept


def test_h2_cookie_crumbs_are_joined_where_the_first_stood_and_signed_as_joined():
    raw = [(b"host", HOST.encode()), (b"cookie", b"a=1"), (b"x-tenant", b"t"), (b"cookie", b"b=2"),
           (b"cookie", b"c=3")]
    prep = preparer({"extra_signed_headers": ["cookie"]})
    h2 = prep.prepare("GET", None, "/", raw, None, from_h2=True).headers
    assert [(n, v) for n, v in h2 if not n.startswith((b"x-amz-", b"authorization"))] == \
        [(b"cookie", b"a=1; b=2; c=3"), (b"x-tenant", b"t")]
    authorization = dict(h2)[b"authorization"].decode()
    assert authorization == botocore_authorization("GET", "/", [("cookie", "a=1; b=2; c=3")])
    h1 = prep.prepare("GET", None, "/", raw, None).headers  # HTTP/1.1 fields pass as they came
    assert [v for n, v in h1 if n == b"cookie"] == [b"a=1", b"b=2", b"c=3"]


def test_an_h2c_upgrade_offer_is_declined_not_forwarded():
    # curl --http2 on an http:// URL: the request goes on in HTTP/1.1, minus the upgrade fields.
    raw = [(b"Host", HOST.encode()), (b"Connection", b"Upgrade, HTTP2-Settings"),
           (b"Upgrade", b"h2c"), (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA"), (b"X-Keep", b"1")]
    names = {n for n, _ in preparer().prepare("GET", None, "/", raw, None).headers}
    assert b"x-keep" in names and not names & {b"upgrade", b"http2-settings", b"connection"}


@pytest.mark.parametrize("method, authority, raw, length, error", [
    ("CONNECT", None, [(b"Host", HOST.encode())], None, MethodNotSupported),
    ("GET", None, [(b"Host", HOST.encode()), (b"HOST", HOST.encode())], None, BadRequest),
    ("GET", None, [(b"Host", HOST.encode()), (b"Upgrade", b"websocket")], None, BadRequest),
    ("GET", None, [(b"Host", HOST.encode()), (b"Upgrade", b"h2c, websocket")], None, BadRequest),
    ("GET", "other.example", [(b"Host", HOST.encode())], None, BadRequest),
    ("POST", None, [(b"Host", HOST.encode())], 1025, PayloadTooLarge),
])
def test_refusals(method, authority, raw, length, error):
    with pytest.raises(error):
        preparer(max_body_size=1024).prepare(method, authority, "/", raw, length)


def test_names_are_classified_once_per_spelling_and_the_memory_is_bounded():
    prep = preparer()
    for i in range(3000):
        prep.prepare("GET", None, "/", [(b"Host", HOST.encode()), (b"X-N%d" % i, b"v")], None)
    assert len(prep._request_names) == 1024  # bounded: names come from clients
    again = prep.prepare("GET", None, "/", [(b"Host", HOST.encode()), (b"X-N2999", b"v")], None)
    assert again.headers[0] == (b"x-n2999", b"v")  # past the bound: still right, just not cached
