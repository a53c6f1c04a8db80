"""Config: flags > environment > file > defaults, validation errors name the key."""

import argparse

import pytest

from sigv4proxy import config as cfg


def parse_flags(argv):
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    return {k: v for k, v in vars(parser.parse_args(argv)).items()}


def test_defaults():
    c = cfg.from_sources({}, env={}, file_data={})
    assert c.listen_addrs == (("127.0.0.1", 8080), ("::1", 8080))  # both loopbacks
    assert c.admin_addr == ("127.0.0.1", 9901)
    assert c.service == "vpc-lattice-svcs"
    assert c.allow_host == cfg.DEFAULT_ALLOW_HOSTS
    assert c.upstream_protocol == "auto" and c.workers == 1 and c.drain_timeout == 20
    # VPC Lattice closes idle client connections after 60 s and every one after 10 minutes: ours
    # retire first (an aged one at 90-100 % of max_connection_age)
    assert c.idle_timeout == 50 and c.max_connection_age == 570


def test_precedence_flags_over_env_over_file():
    file_data = {"listen": "127.0.0.1:1000", "region": "eu-west-1", "upstream_protocol": "http1", "connect_timeout": 3}
    env = {"SIGV4PROXY_LISTEN": "127.0.0.1:2000", "SIGV4PROXY_REGION": "us-east-2"}
    flags = parse_flags(["--listen", "127.0.0.1:3000"])
    c = cfg.from_sources(flags, env=env, file_data=file_data)
    assert c.listen == ("127.0.0.1:3000",)  # flag wins
    assert c.region == "us-east-2"  # env beats file
    assert c.upstream_protocol == "http1"  # file beats default
    assert c.connect_timeout == 3.0


def test_listen_is_repeatable_from_flags_env_and_file():
    flags = parse_flags(["--listen", "127.0.0.1:8080", "--listen", "[::1]:8080"])
    assert cfg.from_sources(flags, env={}, file_data={}).listen_addrs == (("127.0.0.1", 8080), ("::1", 8080))
    env = {"SIGV4PROXY_LISTEN": "127.0.0.1:9000,[::1]:9000"}
    assert cfg.from_sources({}, env=env, file_data={}).listen == ("127.0.0.1:9000", "[::1]:9000")
    from_file = cfg.from_sources({}, env={}, file_data={"listen": ["[fd00:ec2:80::5]:80", "10.0.0.1:80"]})
    assert from_file.listen_addrs == (("fd00:ec2:80::5", 80), ("10.0.0.1", 80))


@pytest.mark.parametrize("value, expected", [
    ("8080", ("127.0.0.1:8080", "[::1]:8080")),  # a bare port: loopback, both families
    (":8005", ("0.0.0.0:8005", "[::]:8005")),  # the Go sidecar's form: every interface, both
    ("[::]:80", ("[::]:80",)),
    ("localhost:8080", ("localhost:8080",)),
])
def test_listen_shorthands_expand_to_what_is_bound(value, expected):
    assert cfg.from_sources({}, env={}, file_data={"listen": value}).listen == expected


@pytest.mark.parametrize("value, message", [
    ("::1:8080", "IPv6 address goes in brackets"),
    ("[not-ipv6]:80", "brackets hold an IPv6 address"),
    ("[::1]", "expected HOST:PORT"),
    (["127.0.0.1:8080", "8080"], "127.0.0.1:8080 is listed twice"),
    ([], "at least one"),
    ("[::1]:70000", "port out of range"),
])
def test_bad_listen_values_say_why(value, message):
    with pytest.raises(cfg.ConfigError, match=rf"^listen: .*{message}"):
        cfg.from_sources({}, env={}, file_data={"listen": value})


def test_aws_region_and_ca_bundle_from_env(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    c = cfg.from_sources({}, env={"AWS_REGION": "ap-south-1", "AWS_CA_BUNDLE": str(bundle)}, file_data={})
    assert c.region == "ap-south-1" and c.ca_bundle == str(bundle)


def test_repeatable_flags_and_routes():
    flags = parse_flags([
        "--allow-host", "*.example.internal", "--allow-host", "api.local",
        "--route", "/=http://127.0.0.1:8081,sign_host=svc-1.abc.vpc-lattice-svcs.us-west-2.on.aws,protocol=h2",
        "--route", "orders.local/api=https://orders.example.com",
    ])
    c = cfg.from_sources(flags, env={}, file_data={})
    assert c.allow_host == ("*.example.internal", "api.local")
    r0, r1 = c.route
    assert r0.path_prefix == "/" and r0.host is None and r0.protocol == "h2"
    assert r0.sign_host == "svc-1.abc.vpc-lattice-svcs.us-west-2.on.aws"
    assert r1.host == "orders.local" and r1.path_prefix == "/api" and r1.upstream == "https://orders.example.com"


def test_file_routes_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream-protocol: h2\n"
        "routes_unused_is_an_error: false\n"
    )
    with pytest.raises(cfg.ConfigError, match="routes_unused_is_an_error"):
        cfg.from_sources({"config": str(path)}, env={})
    path.write_text(
        "route:\n"
        "  - match: {host: 'orders.local', path_prefix: /v1}\n"
        "    upstream: http://127.0.0.1:9000\n"
        "    sign_host: orders.vpc-lattice-svcs.us-east-1.on.aws\n"
        "    extra_signed_headers: [x-tenant]\n"
    )
    c = cfg.from_sources({"config": str(path)}, env={})
    (route,) = c.route
    assert route.host == "orders.local" and route.path_prefix == "/v1"
    assert route.extra_signed_headers == ("x-tenant",)


@pytest.mark.parametrize(
    "source, key",
    [
        ({"upstream_protocol": "h3"}, "upstream_protocol"),
        ({"listen": "127.0.0.1:notaport"}, "listen"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"workers": "many"}, "workers"),
        ({"upstream": "ftp://x"}, "upstream"),
        ({"route": ["nopattern"]}, "route"),
        ({"verify_tls": "perhaps"}, "verify_tls"),
        ({"add_header": ["x-team"]}, "add_header"),
        ({"add_header": ["X-Amz-Date=20240101T000000Z"]}, "add_header"),  # the signer's own
        ({"add_header": ["Host=elsewhere.example"]}, "add_header"),
        ({"add_header": ["transfer-encoding=chunked"]}, "add_header"),
        ({"add_header": ["x-team=\u20ac"]}, "add_header"),  # not Latin-1: never sendable
    ],
)
def test_bad_values_name_the_key(source, key):
    with pytest.raises(cfg.ConfigError, match=key):
        cfg.from_sources({}, env={}, file_data=source)


def test_bad_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("listen: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.from_sources({"config": str(path)}, env={})


def test_bool_flags_and_workers_auto():
    c = cfg.from_sources(parse_flags(["--no-verify-tls", "--workers", "auto"]), env={}, file_data={})
    assert c.verify_tls is False and c.workers >= 1


def test_redacted_is_plain_data():
    c = cfg.from_sources(parse_flags(["--route", "/=http://127.0.0.1:1"]), env={}, file_data={})
    data = c.redacted()
    assert data["route"] == [{"upstream": "http://127.0.0.1:1", "path_prefix": "/"}]
    assert data["allow_host"] == list(cfg.DEFAULT_ALLOW_HOSTS)
