"""Routing: allow-list (never an open relay), route matching, region inference, Target shape."""

import pytest

from sigv4proxy import config as cfg
from sigv4proxy.errors import BadRequest, HostNotAllowed
from sigv4proxy.aws.routing import Router, split_host

LATTICE = "svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"


def router(**values):
    return Router(cfg.from_sources({}, env={}, file_data=values))


def test_default_target_is_https_443_with_region_from_host():
    t = router().resolve(LATTICE, "/x")
    assert (t.origin.scheme, t.origin.host, t.origin.port) == ("https", LATTICE, 443)
    assert t.authority == LATTICE and t.name == "default"
    assert t.signer.region == "us-west-2" and t.signer.service == "vpc-lattice-svcs"


def test_upstream_override_keeps_the_apps_host():
    t = router(upstream="http://127.0.0.1:9999", upstream_protocol="h2").resolve(LATTICE + ":80", "/")
    assert (t.origin.scheme, t.origin.host, t.origin.port, t.origin.protocol) == ("http", "127.0.0.1", 9999, "h2")
    assert t.authority == LATTICE


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "evil.com.",
        "svc.vpc-lattice-svcs.us-west-2.on.aws.evil.com",
        "169.254.169.254",
        "[::1]",
        "[::ffff:169.254.169.254]:80",
        "localhost",
        "vpc-lattice-svcs.us-west-2.on.aws",  # no service label before it
    ],
)
def test_hosts_outside_the_allow_list_are_refused(host):
    with pytest.raises(HostNotAllowed):
        router().resolve(host, "/")


@pytest.mark.parametrize(
    "host",
    [
        "user@" + LATTICE,
        LATTICE + "%2eevil.com",
        "[::1",
        "[zz::]",
        "[fe80::1%eth0]",
        "[::1]x",
        "evil.com/" + LATTICE,
        "",
        "a..b",
        LATTICE + ":99999",
        "exa mple.com",
    ],
)
def test_malformed_hosts_are_bad_requests(host):
    r = router()
    for _ in range(2):  # the second time too: a refused Host value is never remembered
        with pytest.raises(BadRequest):
            r.resolve(host or " ", "/")


def test_remembered_host_spellings_resolve_like_fresh_ones():
    r = router()
    spellings = [LATTICE, LATTICE.upper() + ".", f" {LATTICE}:443 ", LATTICE + ":8443"]
    def where(t):
        return t.origin, t.authority, t.name

    first = [r.resolve(h, "/") for h in spellings]
    again = [r.resolve(h, "/") for h in spellings]
    fresh = [router().resolve(h, "/") for h in spellings]
    assert first == again  # the very same targets
    assert [where(t) for t in first] == [where(t) for t in fresh]
    assert [t.origin.port for t in first] == [443, 443, 443, 8443]


def test_case_trailing_dot_and_port_are_normalized_for_the_allow_list():
    r = router()
    assert r.resolve(LATTICE.upper() + ".", "/").authority == LATTICE
    assert split_host(LATTICE.upper() + ".:8443") == (LATTICE, 8443)
    assert r.resolve(LATTICE + ":8443", "/").origin.port == 8443


def test_ipv6_literals_have_one_spelling_and_reach_path_routes():
    # An app in an IPv6 pod calling http://[::1]:8080/ sends that Host: a path route serves it;
    # without one it is just another host outside the allow-list.
    assert split_host("[0:0:0:0:0:0:0:1]:8080") == ("[::1]", 8080)
    assert split_host("[::FFFF:169.254.169.254]") == ("[::ffff:a9fe:a9fe]", None)
    r = router(route=[{"path_prefix": "/", "upstream": "http://127.0.0.1:9001", "sign_host": LATTICE}])
    t = r.resolve("[::1]:8080", "/hello")
    assert t.origin.port == 9001 and t.authority == LATTICE
    allow_all = router(allow_host=["*"], region="us-west-2")
    t = allow_all.resolve("[::1]:8443", "/")
    assert (t.origin.host, t.origin.port, t.authority) == ("::1", 8443, "[::1]:8443")


def test_routes_match_host_and_prefix_in_order_and_are_allowed():
    r = router(
        route=[
            {"host": "orders.local", "path_prefix": "/v1", "upstream": "http://127.0.0.1:9001",
             "sign_host": "orders.vpc-lattice-svcs.eu-west-1.on.aws", "name": "orders"},
            {"path_prefix": "/", "upstream": "https://127.0.0.1:9002", "sign_host": "other.example.com",
             "region": "us-east-1", "service": "execute-api"},
        ]
    )
    t = r.resolve("orders.local:8080", "/v1/items")
    assert t.name == "orders" and t.origin.port == 9001 and t.signer.region == "eu-west-1"
    t2 = r.resolve("orders.local", "/v2")
    assert t2.name == "route1" and t2.authority == "other.example.com"
    assert t2.signer.service == "execute-api" and t2.signer.region == "us-east-1"


def test_region_required_when_host_does_not_say():
    with pytest.raises(BadRequest, match="region"):
        router(allow_host=["*.example.internal"]).resolve("a.example.internal", "/")
    t = router(allow_host=["*.example.internal"], region="eu-north-1").resolve("a.example.internal", "/")
    assert t.signer.region == "eu-north-1"


def test_targets_are_cached_per_host():
    r = router()
    assert r.resolve(LATTICE, "/a") is r.resolve(LATTICE, "/b")


def test_transparent_original_destination_becomes_the_origin():
    t = router().resolve(LATTICE, "/", original_dst=("169.254.171.5", 80))
    assert (t.origin.scheme, t.origin.host, t.origin.port) == ("http", "169.254.171.5", 80)
    assert t.authority == LATTICE and t.name == "transparent"
