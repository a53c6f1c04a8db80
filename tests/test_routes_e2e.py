"""Several services per sidecar: one YAML config file with routes (by host pattern and by path
prefix) to three Lattice simulators, each with its own region and service ARN, over h2c and
HTTP/1.1, with SigV4 and SigV4A, an extra signed header and a route's own upstream timeout.

Each request must be verified by the simulator its route names (its access log shows the caller
and 200) and by no other; unmatched Lattice hosts use the defaults; other hosts are refused.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import aiohttp
import pytest

from sigv4proxy import config as config_mod
from sigv4proxy.runtime.app import ProxyApp
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.aws.routing import Router
from sigv4proxy.sim.server import SimConfig, SimServer, start_simulator
from support.proxy import PRINCIPAL, SECRET_KEY, static_credentials, write_identities

ARN = "arn:aws:vpc-lattice:{region}:111122223333:service/svc-{name}"
ORDERS_HOST = "svc-orders.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
BILLING_HOST = "svc-billing.7d67968.vpc-lattice-svcs.us-east-1.on.aws"
SLOW_HOST = "svc-slow.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
DEFAULT_HOST = "svc-other.7d67968.vpc-lattice-svcs.us-west-2.on.aws"

CONFIG_YAML = """\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstream: http://127.0.0.1:{default}   # requests that match no route (allowed hosts only)
upstream_protocol: h2
connect_timeout: 2
first_byte_timeout: 5
route:
  - name: orders                       # SigV4, us-west-2, h2c, signs x-tenant too
    match: {{host: orders.local}}
    upstream: http://127.0.0.1:{orders}
    protocol: h2
    sign_host: {orders_host}
    extra_signed_headers: [x-tenant]
  - name: billing                      # SigV4, us-east-1 (from the sign host), HTTP/1.1
    match: {{path_prefix: /billing/}}
    upstream: http://127.0.0.1:{billing}
    protocol: http1
    sign_host: {billing_host}
  - name: inventory                    # SigV4A for two regions, h2c, non-Lattice sign host
    match: {{host: "*.inventory.internal"}}
    upstream: http://127.0.0.1:{billing}
    protocol: h2
    sign_host: inventory.internal.example
    signing_algorithm: sigv4a
    region_set: [us-east-1, us-west-2]
  - name: reports                      # explicit region for a non-Lattice sign host
    match: {{host: reports.local, path_prefix: /r/}}
    upstream: http://127.0.0.1:{billing}
    protocol: http1
    sign_host: reports.internal.example
    region: us-east-1
  - name: slow                         # its own first-byte timeout
    match: {{host: slow.local}}
    upstream: http://127.0.0.1:{slow}
    protocol: h2
    sign_host: {slow_host}
    first_byte_timeout: 0.5
"""


@dataclass
class Stack:
    proxy: ProxyApp
    sims: dict[str, SimServer]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.proxy.port}{path}"

    def seen_by(self) -> dict[str, list[dict]]:
        return {name: sim.records for name, sim in self.sims.items()}


async def start_sim(tmp_path: pathlib.Path, name: str, region: str) -> SimServer:
    return await start_simulator(SimConfig(
        host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)), policy=None,
        service_arn=ARN.format(region=region, name=name), region=region))


def write_config(tmp_path: pathlib.Path, sims: dict[str, SimServer]) -> pathlib.Path:
    path = tmp_path / "sigv4proxy.yaml"
    path.write_text(CONFIG_YAML.format(
        default=sims["default"].port, orders=sims["orders"].port, billing=sims["billing"].port,
        slow=sims["slow"].port, orders_host=ORDERS_HOST, billing_host=BILLING_HOST, slow_host=SLOW_HOST))
    return path


@pytest.fixture
async def stack(tmp_path):
    sims: dict[str, SimServer] = {}
    proxy = None
    try:
        for name, region in (("orders", "us-west-2"), ("billing", "us-east-1"),
                             ("default", "us-west-2"), ("slow", "us-west-2")):
            sims[name] = await start_sim(tmp_path, name, region)
        config = config_mod.from_sources({"config": str(write_config(tmp_path, sims))}, env={})
        proxy = ProxyApp(config, credentials=static_credentials(), metrics=Metrics())
        await proxy.start()
        yield Stack(proxy, sims)
    finally:
        if proxy is not None:
            await proxy.stop(drain_timeout=2)
        for sim in sims.values():
            await sim.aclose()


async def fetch(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, dict, bytes]:
    # A session per request, closed before the proxy stops (no idle keep-alive to wait for).
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.request(method, url, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


# (test id, Host the app sends, path, simulator that must verify it, authority it sees,
#  protocol it sees, a header that must be among the signed ones)
ROUTED = [
    ("orders-h2c-extra-header", "orders.local", "/orders/1?x=1", "orders", ORDERS_HOST, "HTTP/2", "x-tenant"),
    ("billing-other-region-http1", "anything.local", "/billing/invoices", "billing", BILLING_HOST, "HTTP/1.1", None),
    ("inventory-sigv4a", "eu.inventory.internal", "/items", "billing", "inventory.internal.example", "HTTP/2",
     "x-amz-region-set"),
    ("reports-explicit-region", "reports.local", "/r/daily", "billing", "reports.internal.example", "HTTP/1.1", None),
    ("default-lattice-host", DEFAULT_HOST, "/other", "default", DEFAULT_HOST, "HTTP/2", None),
]


@pytest.mark.parametrize("case", ROUTED, ids=[c[0] for c in ROUTED])
async def test_each_route_is_verified_by_its_own_simulator(stack, case):
    _, host, path, sim_name, authority, protocol, signed = case
    status, headers, body = await fetch(stack.url(path), {"Host": host, "X-Tenant": "t-42"})
    assert status == 200, body
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL
    assert (echo["authority"], echo["protocol"]) == (authority, protocol)
    assert echo["path"] + ("?" + echo["query"] if echo["query"] else "") == path
    sim = stack.sims[sim_name]
    assert f"ServiceArn={sim.cfg.service_arn};" in headers["x-amzn-lattice-target"]
    if signed is not None:
        assert signed in echo["signed_headers"]
    if sim_name != "orders":  # only the orders route signs x-tenant
        assert "x-tenant" not in echo["signed_headers"]
    # Exactly one simulator saw the request, and it accepted the caller.
    seen = {name: records for name, records in stack.seen_by().items() if records}
    assert list(seen) == [sim_name]
    (record,) = seen[sim_name]
    assert (record["responseCode"], record["callerPrincipal"], record["authDeniedReason"]) == (200, PRINCIPAL, "-")
    assert SECRET_KEY.encode() not in body


async def test_sigv4a_route_signs_its_region_set_and_sigv4_routes_do_not(stack):
    _, _, body = await fetch(stack.url("/items"), {"Host": "a.inventory.internal"})
    assert [v for n, v in json.loads(body)["headers"] if n == "x-amz-region-set"] == ["us-east-1,us-west-2"]
    _, _, body = await fetch(stack.url("/billing/x"), {"Host": "a.local"})
    assert "x-amz-region-set" not in json.loads(body)["signed_headers"]


async def test_host_outside_routes_and_allow_list_is_refused(stack):
    for host in ("example.com", "orders.local.evil.com", "169.254.169.254"):
        status, headers, body = await fetch(stack.url("/x"), {"Host": host})
        assert status == 403, (host, body)
        assert headers["x-sigv4proxy-error"] == "host_not_allowed"
    assert all(not records for records in stack.seen_by().values())


async def test_route_path_prefix_is_required_where_configured(stack):
    # reports.local routes only under /r/; elsewhere it matches nothing and is not allowed.
    status, headers, _ = await fetch(stack.url("/other"), {"Host": "reports.local"})
    assert (status, headers["x-sigv4proxy-error"]) == (403, "host_not_allowed")


async def test_route_first_byte_timeout_applies_to_its_route_only(stack):
    delay = {"x-sim-delay-ms": "1500"}
    status, headers, _ = await fetch(stack.url("/x"), {"Host": "slow.local", **delay})
    assert (status, headers.get("x-sigv4proxy-error")) == (504, "upstream_timeout")
    # The same delay through a route on the global 5 s timeout is answered.
    status, _, body = await fetch(stack.url("/x"), {"Host": DEFAULT_HOST, **delay})
    assert status == 200, body


# --- configuration checks for routes (no sockets) ---

def test_routes_sharing_an_origin_must_share_timeouts():
    route = {"upstream": "http://127.0.0.1:9", "protocol": "h2", "sign_host": ORDERS_HOST}
    values = {"route": [{**route, "host": "a.local"}, {**route, "host": "b.local", "read_timeout": 3}]}
    with pytest.raises(config_mod.ConfigError, match="same timeouts"):
        Router(config_mod.from_sources({}, env={}, file_data=values))
    values = {"upstream": "http://127.0.0.1:9", "upstream_protocol": "h2",
              "route": [{**route, "host": "a.local", "connect_timeout": 1}]}
    with pytest.raises(config_mod.ConfigError, match="same timeouts"):
        Router(config_mod.from_sources({}, env={}, file_data=values))


def test_origin_timeouts_lists_only_routes_that_override():
    values = {"first_byte_timeout": 7, "route": [
        {"host": "a.local", "upstream": "http://127.0.0.1:9", "sign_host": ORDERS_HOST, "first_byte_timeout": 2},
        {"host": "b.local", "upstream": "http://127.0.0.1:10", "sign_host": ORDERS_HOST},
    ]}
    router = Router(config_mod.from_sources({}, env={}, file_data=values))
    overrides = router.origin_timeouts()
    assert [(o.port, t.first_byte, t.connect) for o, t in overrides.items()] == [(9, 2.0, 5.0)]


def test_a_route_sets_its_own_connection_age():
    values = {"max_connection_age": 100, "route": [
        f"a.local=http://127.0.0.1:9,sign_host={ORDERS_HOST},max_connection_age=30",
        f"b.local=http://127.0.0.1:10,sign_host={ORDERS_HOST},max_connection_age=0",  # no limit
        f"c.local=http://127.0.0.1:11,sign_host={ORDERS_HOST}",
    ]}
    router = Router(config_mod.from_sources(values, env={}))
    assert {o.port: t.max_age for o, t in router.origin_timeouts().items()} == {9: 30.0, 10: 0.0}
    with pytest.raises(config_mod.ConfigError, match="max_connection_age"):
        config_mod.from_sources({"route": ["a.local=http://127.0.0.1:9,max_connection_age=-1"]}, env={})


@pytest.mark.parametrize("option, value", [("first_byte_timeout", "0"), ("read_timeout", "soon"),
                                           ("connect_timeout", "-1")])
def test_bad_route_timeouts_name_the_key(option, value):
    with pytest.raises(config_mod.ConfigError, match=option):
        config_mod.from_sources({"route": [f"a.local=http://127.0.0.1:9,{option}={value}"]}, env={})
