"""SigV4A end to end: app → proxy (`signing_algorithm=sigv4a`) → Lattice simulator over h2c and
HTTP/1.1 on loopback. The simulator re-verifies the ECDSA signature with its own, independent
SigV4A verifier (`sim/verify_v4a.py`) from the bytes that arrived."""

from __future__ import annotations

import argparse
import hashlib
import json

import aiohttp
import pytest

from sigv4proxy import config as config_mod
from sigv4proxy.aws.sigv4a import SigV4ASigner
from sigv4proxy.aws.routing import Router
from sigv4proxy.sim import verify as sim_verify
from sigv4proxy.sim.server import SimConfig, start_simulator
from support.proxy import (LATTICE_HOST, PRINCIPAL, SECRET_KEY, SERVICE_ARN, SESSION_TOKEN,
                           running_proxy, write_identities)

PROTOCOLS = ["h2", "http1"]


@pytest.fixture
async def sim(tmp_path):
    server = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)),
                                             policy=None, service_arn=SERVICE_ARN, region="us-west-2"))
    yield server
    await server.aclose()


@pytest.fixture
def v4a_verifications(monkeypatch):
    """Counts the requests the simulator accepted through its SigV4A verifier (and only that)."""
    accepted: list[str] = []
    real = sim_verify.VERIFIERS[sim_verify.SIGV4A_ALGORITHM]

    def spy(req, auth_value, ctx):
        verified = real(req, auth_value, ctx)
        accepted.append(verified.auth.scope)
        return verified

    monkeypatch.setitem(sim_verify.VERIFIERS, sim_verify.SIGV4A_ALGORITHM, spy)
    return accepted


def v4a_via(sim, protocol, **extra):
    return dict(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol=protocol,
                signing_algorithm="sigv4a", **extra)


async def fetch(url, **kw):
    # A session per request, closed before the proxy stops: no idle keep-alive for it to wait on.
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.request(kw.pop("method", "GET"), url, **kw) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def echoed(echo, name):
    return [v for n, v in echo["headers"] if n == name]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_sigv4a_request_verifies_at_the_simulator(sim, v4a_verifications, protocol):
    async with running_proxy(**v4a_via(sim, protocol)) as proxy:
        status, _, body = await fetch(f"http://127.0.0.1:{proxy.port}/orders/42?b=2&a=1",
                                      headers={"Host": LATTICE_HOST})
    assert status == 200, body
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL
    assert echo["protocol"] == ("HTTP/2" if protocol == "h2" else "HTTP/1.1")
    assert echo["authority"] == LATTICE_HOST
    for name in ("host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token", "x-amz-region-set"):
        assert name in echo["signed_headers"]
    assert echoed(echo, "x-amz-region-set") == ["*"]
    assert len(v4a_verifications) == 1 and v4a_verifications[0].endswith("/vpc-lattice-svcs/aws4_request")
    assert SECRET_KEY.encode() not in body and SESSION_TOKEN.encode() not in body


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_sigv4a_streams_a_body_and_verifies(sim, v4a_verifications, protocol):
    payload = bytes(range(256)) * 4096  # 1 MiB, never hashed by the proxy (UNSIGNED-PAYLOAD)

    async def chunks():
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    async with running_proxy(**v4a_via(sim, protocol)) as proxy:
        status, _, body = await fetch(f"http://127.0.0.1:{proxy.port}/upload", method="PUT",
                                      headers={"Host": LATTICE_HOST}, data=chunks())
    assert status == 200, body
    echo = json.loads(body)
    assert echo["body_length"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert len(v4a_verifications) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_region_set_list_is_signed_and_a_client_copy_is_dropped(sim, v4a_verifications, protocol):
    async with running_proxy(**v4a_via(sim, protocol, region_set="us-east-1,us-west-2")) as proxy:
        status, _, body = await fetch(f"http://127.0.0.1:{proxy.port}/x",
                                      headers={"Host": LATTICE_HOST, "X-Amz-Region-Set": "eu-west-1"})
    assert status == 200, body
    assert echoed(json.loads(body), "x-amz-region-set") == ["us-east-1,us-west-2"]
    assert len(v4a_verifications) == 1


async def test_region_set_that_excludes_the_simulator_is_refused_there(sim, v4a_verifications):
    async with running_proxy(**v4a_via(sim, "h2", region_set="eu-*,ap-southeast-2")) as proxy:
        status, headers, body = await fetch(f"http://127.0.0.1:{proxy.port}/x",
                                            headers={"Host": LATTICE_HOST})
    # The simulator's answer is forwarded as it is: the proxy signed, the service said no.
    assert status == 403, body
    assert headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert b"X-Amz-Region-Set" in body
    assert v4a_verifications == []


async def test_sigv4_is_still_the_default(sim, v4a_verifications):
    async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2") as proxy:
        status, _, body = await fetch(f"http://127.0.0.1:{proxy.port}/x", headers={"Host": LATTICE_HOST})
    assert status == 200, body
    echo = json.loads(body)
    assert "x-amz-region-set" not in echo["signed_headers"] and echoed(echo, "x-amz-region-set") == []
    assert v4a_verifications == []


# --- configuration → signer (no sockets needed) ---

def test_flags_and_env_select_sigv4a():
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    flags = vars(parser.parse_args(["--signing-algorithm", "sigv4a", "--region-set", "us-west-2,us-east-1"]))
    config = config_mod.from_sources(flags, env={})
    assert (config.signing_algorithm, config.region_set) == ("sigv4a", "us-west-2,us-east-1")
    config = config_mod.from_sources({}, env={"SIGV4PROXY_SIGNING_ALGORITHM": "sigv4a",
                                               "SIGV4PROXY_REGION_SET": "*"})
    target = Router(config).resolve(LATTICE_HOST, "/")
    assert isinstance(target.signer, SigV4ASigner) and target.signer.region_set == "*"
    # A YAML list works for the file form.
    config = config_mod.from_sources({}, env={}, file_data={"signing_algorithm": "sigv4a",
                                                            "region_set": ["us-west-2", "us-east-1"]})
    assert config.region_set == "us-west-2,us-east-1"


def test_sigv4a_needs_no_region_for_a_non_lattice_route():
    config = config_mod.from_sources({}, env={}, file_data={
        "route": [{"host": "orders.local", "upstream": "http://127.0.0.1:1", "sign_host": "orders.internal",
                   "signing_algorithm": "sigv4a"}]})
    target = Router(config).resolve("orders.local", "/")
    assert isinstance(target.signer, SigV4ASigner) and target.authority == "orders.internal"


@pytest.mark.parametrize("values, key", [
    ({"signing_algorithm": "sigv5"}, "signing_algorithm"),
    ({"region_set": "us west 2"}, "region_set"),
    ({"region_set": ""}, "region_set"),
    ({"region_set": "us-west-2,[x]"}, "region_set"),
    ({"route": [{"upstream": "http://127.0.0.1:1", "signing_algorithm": "v4a"}]}, "signing_algorithm"),
    ({"route": [{"upstream": "http://127.0.0.1:1", "region_set": "us-*"}]}, "region_set applies"),
    ({"route": [{"upstream": "http://127.0.0.1:1", "signing_algorithm": "sigv4a", "region": "us-east-1"}]},
     "region_set, not region"),
])
def test_bad_sigv4a_settings_name_the_key(values, key):
    with pytest.raises(config_mod.ConfigError, match=key):
        config_mod.from_sources({}, env={}, file_data=values)


def test_route_flag_carries_sigv4a_options():
    config = config_mod.from_sources(
        {"route": ["orders.local=http://127.0.0.1:1,signing_algorithm=sigv4a,region_set=us-west-2;us-east-1"]},
        env={})
    (route,) = config.route
    assert (route.signing_algorithm, route.region_set) == ("sigv4a", "us-west-2,us-east-1")
    signer = Router(config).resolve("orders.local", "/").signer
    assert isinstance(signer, SigV4ASigner) and signer.region_set == "us-west-2,us-east-1"
