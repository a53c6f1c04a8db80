"""Path escaping as a setting (`--uri-path-escaping double|single`), over real sockets.

The proxy in each mode, globally and per route, in front of Lattice simulators in each mode (the
simulator's verifier is written independently of the proxy's signer), over h2c and HTTP/1.1,
SigV4 and SigV4A: a request verifies where the modes match, and where they do not it is refused
with Lattice's 403 exactly for the paths whose two canonical URIs differ. Those URIs are written
by hand below from the SigV4 rules. botocore's SigV4Auth (double encoding only) and awscrt (both
ways, `use_double_uri_encode`) recompute the signature of each request as it arrived at a
capture server. Also: the setting from flag, environment, file and route option, what
`check-config` prints, and the exit status 2 naming the key for a bad value.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import datetime
import os
import subprocess
import sys
import time
from unittest import mock

import aiohttp
import botocore.auth
import botocore.credentials
import pytest
import yaml
from awscrt import auth as crt_auth
from awscrt import http as crt_http
from botocore.awsrequest import AWSRequest
from yarl import URL

from sigv4proxy import config as config_mod
from sigv4proxy.sim.server import SimConfig, start_simulator
from support.proxy import (ACCESS_KEY, LATTICE_HOST, SECRET_KEY, SERVICE_ARN, running_proxy,
                           write_identities)
from support.upstream_servers import H1TestServer

MODES = ("double", "single")
# (wire path, canonical URI with double encoding, with single encoding), from the SigV4 rules.
PATHS = [
    ("/orders/42", "/orders/42", "/orders/42"),                          # plain: both agree
    ("/files/a%20b", "/files/a%2520b", "/files/a%20b"),                  # an escaped space
    ("/files/a%2Fb", "/files/a%252Fb", "/files/a%2Fb"),                  # an escaped slash
    ("/files/50%2520off", "/files/50%252520off", "/files/50%2520off"),   # an escaped "%20"
    ("/caf%C3%A9/%E2%82%AC", "/caf%25C3%25A9/%25E2%2582%25AC", "/caf%C3%A9/%E2%82%AC"),  # UTF-8
]


def other(mode: str) -> str:
    return "single" if mode == "double" else "double"


def agree(path: str) -> bool:
    return next(d == s for p, d, s in PATHS if p == path)


@contextlib.asynccontextmanager
async def stack(tmp_path, escaping: str, protocol: str, algorithm: str = "sigv4"):
    """Two simulators (double, single) and a proxy whose global setting is `escaping`, with
    routes `double.local` and `single.local` (no override, each to the simulator of that mode)
    and `override.local` (to the other mode's simulator, with that mode as its own setting)."""
    identities = str(write_identities(tmp_path))
    sims = {}
    try:
        for mode in MODES:
            sims[mode] = await start_simulator(SimConfig(
                host="127.0.0.1", port=0, identities=identities, service_arn=SERVICE_ARN,
                uri_path_escaping=mode))

        def route(host: str, mode: str, **extra) -> dict:
            return {"match": {"host": host}, "upstream": f"http://127.0.0.1:{sims[mode].port}",
                    "protocol": protocol, "sign_host": LATTICE_HOST, **extra}

        routes = [route(f"{mode}.local", mode) for mode in MODES]
        routes.append(route("override.local", other(escaping), uri_path_escaping=other(escaping)))
        async with running_proxy(route=routes, uri_path_escaping=escaping,
                                 signing_algorithm=algorithm) as proxy:
            yield proxy, sims
    finally:
        for sim in sims.values():
            await sim.aclose()


async def get(client: aiohttp.ClientSession, port: int, host: str, path: str) -> tuple[int, dict, str]:
    # encoded=True: the path goes on the wire exactly as written, never re-quoted.
    async with client.get(URL(f"http://127.0.0.1:{port}{path}", encoded=True),
                          headers={"Host": host}) as resp:
        return resp.status, dict(resp.headers), (await resp.read()).decode()


STACKS = [("double", "h2", "sigv4"), ("single", "h2", "sigv4"), ("double", "http1", "sigv4"),
          ("single", "http1", "sigv4"), ("double", "h2", "sigv4a"), ("single", "h2", "sigv4a")]


@pytest.mark.parametrize("escaping, protocol, algorithm", STACKS)
async def test_each_mode_verifies_in_its_own_mode_and_is_refused_where_the_uris_differ(
        tmp_path, escaping, protocol, algorithm):
    async with stack(tmp_path, escaping, protocol, algorithm) as (proxy, sims):
        async with aiohttp.ClientSession() as client:
            seen = {(path, mode): await get(client, proxy.port, f"{mode}.local", path)
                    for path, _, _ in PATHS for mode in MODES}
    expected = {(path, mode): 200 if mode == escaping or agree(path) else 403
                for path, _, _ in PATHS for mode in MODES}
    assert {key: status for key, (status, _, _) in seen.items()} == expected
    for (path, _), (status, headers, body) in seen.items():
        if status == 200:  # verified, and the path arrived byte for byte as the client sent it
            assert f'"path":"{path}"' in body
        else:  # Lattice's answer to a signature computed over another canonical URI
            assert headers["x-amzn-errortype"] == "InvalidSignatureException"
            assert "does not match the signature you provided" in body
    # Only the mismatched pairs were refused, and every refusal was the signature's.
    for mode in MODES:
        refused = [r for r in sims[mode].records if r["responseCode"] == 403]
        assert all(r["authDeniedReason"] == "InvalidSignatureException" for r in refused)
        assert len(refused) == (0 if mode == escaping else sum(not agree(p) for p, _, _ in PATHS))


@pytest.mark.parametrize("escaping", MODES)
async def test_a_route_setting_beats_the_global_one(tmp_path, escaping):
    async with stack(tmp_path, escaping, "h2") as (proxy, _):
        async with aiohttp.ClientSession() as client:
            for path, _, _ in PATHS:
                # The override route's simulator is in the other mode: every path verifies...
                assert (await get(client, proxy.port, "override.local", path))[0] == 200, path
                # ...which the global setting alone does not do with that simulator.
                status = (await get(client, proxy.port, f"{other(escaping)}.local", path))[0]
                assert status == (200 if agree(path) else 403), path


# --- botocore and awscrt recompute the signature from the request as it arrived ---

def arrived(record: dict) -> tuple[str, dict[str, str]]:
    return record["path"], {name.lower(): value for name, value in record["headers"]}


def signed_at(headers: dict[str, str]) -> datetime.datetime:
    epoch = calendar.timegm(time.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ"))
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)


def botocore_authorization(path: str, headers: dict[str, str]) -> str:
    request = AWSRequest(method="GET", url=f"https://{LATTICE_HOST}{path}")
    request.context["payload_signing_enabled"] = False  # x-amz-content-sha256: UNSIGNED-PAYLOAD
    credentials = botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY,
                                                   headers["x-amz-security-token"])
    with mock.patch("botocore.auth.get_current_datetime",
                    return_value=signed_at(headers).replace(tzinfo=None)):
        botocore.auth.SigV4Auth(credentials, "vpc-lattice-svcs", "us-west-2").add_auth(request)
    return request.headers["Authorization"]


def awscrt_authorization(path: str, headers: dict[str, str], mode: str) -> str:
    config = crt_auth.AwsSigningConfig(
        crt_auth.AwsSigningAlgorithm.V4, crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        crt_auth.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY,
                                                   headers["x-amz-security-token"]),
        "us-west-2", "vpc-lattice-svcs", date=signed_at(headers),
        use_double_uri_encode=mode == "double", should_normalize_uri_path=True,
        signed_body_value=crt_auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
        signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
    request = crt_http.HttpRequest("GET", path, crt_http.HttpHeaders([("host", LATTICE_HOST)]))
    return crt_auth.aws_sign_request(request, config).result(timeout=10).headers.get("authorization")


@pytest.mark.parametrize("escaping", MODES)
async def test_botocore_and_awscrt_verify_what_each_mode_signed(escaping):
    async with H1TestServer() as capture:
        async with running_proxy(upstream=f"http://127.0.0.1:{capture.port}",
                                 upstream_protocol="http1", uri_path_escaping=escaping) as proxy:
            async with aiohttp.ClientSession() as client:
                for path, _, _ in PATHS:
                    assert (await get(client, proxy.port, LATTICE_HOST, path))[0] == 200
    assert len(capture.stats.requests) == len(PATHS)
    for (sent, _, _), record in zip(PATHS, capture.stats.requests):
        path, headers = arrived(record)
        assert path == sent
        authorization = headers["authorization"]
        assert authorization == awscrt_authorization(path, headers, escaping)
        assert (authorization == awscrt_authorization(path, headers, other(escaping))) == agree(path)
        # botocore's SigV4Auth double-encodes: it agrees with single only where the URIs agree.
        assert (authorization == botocore_authorization(path, headers)) == \
            (escaping == "double" or agree(path))


# --- the setting: flag, environment, file, route option; check-config; bad values ---

def flags(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    return vars(parser.parse_args(argv))


def test_the_setting_from_each_source_and_as_a_route_option():
    assert config_mod.from_sources({}, env={}, file_data={}).uri_path_escaping == "double"
    assert config_mod.from_sources({}, env={}, file_data={"uri_path_escaping": "single"}
                                   ).uri_path_escaping == "single"
    env = {"SIGV4PROXY_URI_PATH_ESCAPING": "single"}
    assert config_mod.from_sources({}, env=env, file_data={"uri_path_escaping": "double"}
                                   ).uri_path_escaping == "single"
    assert config_mod.from_sources(flags("--uri-path-escaping", "double"), env=env, file_data={}
                                   ).uri_path_escaping == "double"
    routes = config_mod.from_sources(flags(
        "--route", "a.local=http://127.0.0.1:1,uri_path_escaping=single",
        "--route", "b.local=http://127.0.0.1:2"), env={}, file_data={}).route
    assert [r.uri_path_escaping for r in routes] == ["single", None]  # None: the global setting


def check_config(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIGV4PROXY_")}
    return subprocess.run([sys.executable, "-m", "sigv4proxy", "check-config", *argv],
                          capture_output=True, text=True, timeout=30, env={**clean, **(env or {})})


def test_check_config_shows_the_setting_and_each_route_override():
    default = check_config()
    assert default.returncode == 0 and yaml.safe_load(default.stdout)["uri_path_escaping"] == "double"
    out = check_config("--route", "a.local=http://127.0.0.1:1,uri_path_escaping=double",
                       env={"SIGV4PROXY_URI_PATH_ESCAPING": "single"})
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["uri_path_escaping"] == "single"
    assert shown["route"] == [{"upstream": "http://127.0.0.1:1", "host": "a.local",
                               "uri_path_escaping": "double"}]


@pytest.mark.parametrize("argv, env, file_text, key", [
    (["--uri-path-escaping", "triple"], {}, None, "--uri-path-escaping"),
    ([], {"SIGV4PROXY_URI_PATH_ESCAPING": "none"}, None, "SIGV4PROXY_URI_PATH_ESCAPING"),
    ([], {}, "uri_path_escaping: Double\n", "uri_path_escaping"),
    (["--route", "a.local=http://127.0.0.1:1,uri_path_escaping=s3"], {}, None,
     "route: uri_path_escaping"),
    ([], {}, "route:\n  - {upstream: 'http://127.0.0.1:1', uri_path_escaping: off}\n",
     "route: uri_path_escaping"),
])
def test_a_bad_value_exits_2_naming_the_key(tmp_path, argv, env, file_text, key):
    if file_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(file_text)
        argv = [*argv, "--config", str(path)]
    out = check_config(*argv, env=env)
    assert out.returncode == 2, out
    assert f"{key}: must be one of double, single" in out.stderr and "Traceback" not in out.stderr
