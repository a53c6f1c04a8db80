"""`--listen` repeated: one proxy serving 127.0.0.1 and [::1] (HTTP/1.1 and h2c on each, signatures
re-verified by the simulator), readiness over every listener, a bind failure that names the
address and leaves nothing bound, workers sharing both listeners, and — in network namespaces —
`:PORT` on both wildcards and a host without IPv6 (the IPv6 listener skipped with a warning)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from grpc_support.h2client import H2TestClient
from sigv4proxy.runtime.app import ListenError, ProxyApp
from sigv4proxy.observe.metrics import Metrics
from support.netns import have_netns_support, netns, run_in_netns
from support.proxy import (
    ACCESS_KEY,
    LATTICE_HOST,
    PRINCIPAL,
    SECRET_KEY,
    SESSION_TOKEN,
    proxy_config,
    running_proxy,
    static_credentials,
)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="needs the IPv6 loopback ::1 on this host")


def free_port_on_both_loopbacks() -> int:
    """A port free on 127.0.0.1 and on ::1 alike (bounded tries)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6) as v6:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::1", 0))
            port = v6.getsockname()[1]
            with socket.socket() as v4:
                try:
                    v4.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise AssertionError("no port free on both loopbacks in 50 tries")


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(tcp or tcp6, port) of every listening socket the process holds, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.add((table, int(fields[1].rsplit(":", 1)[1], 16)))
    return found


async def _get(client: aiohttp.ClientSession, url: str, path: str) -> dict:
    async with client.get(url + path, headers={"Host": LATTICE_HOST}) as resp:
        body = await resp.read()
        assert resp.status == 200, body[:300]
        return json.loads(body)


@needs_ipv6
async def test_one_proxy_serves_both_loopbacks_and_both_verify(sim):
    async with running_proxy(listen=["127.0.0.1:0", "[::1]:0"], upstream=f"http://127.0.0.1:{sim.port}",
                             upstream_protocol="h2") as proxy:
        (v4_host, v4_port), (v6_host, v6_port) = proxy.addresses
        assert (v4_host, v6_host) == ("127.0.0.1", "::1") and proxy.port == v4_port
        async with aiohttp.ClientSession() as client:
            over_v4 = await _get(client, f"http://127.0.0.1:{v4_port}", "/over-ipv4")
            over_v6 = await _get(client, f"http://[::1]:{v6_port}", "/over-ipv6")
        async with H2TestClient("::1", v6_port) as h2c:  # h2c (gRPC's way in) on the IPv6 listener
            record = await h2c.wait(h2c.request("GET", "/h2c-over-ipv6", LATTICE_HOST))
    assert record.status == 200, record
    over_h2c = json.loads(bytes(record.body))
    for echo, path in ((over_v4, "/over-ipv4"), (over_v6, "/over-ipv6"), (over_h2c, "/h2c-over-ipv6")):
        assert echo["principal"] == PRINCIPAL and echo["path"] == path  # the simulator verified it
        assert echo["authority"] == LATTICE_HOST


@needs_ipv6
async def test_readiness_counts_every_listener(sim):
    async with running_proxy(listen=["127.0.0.1:0", "[::1]:0"], upstream=f"http://127.0.0.1:{sim.port}") as proxy:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
                assert resp.status == 200
            proxy._proxy_servers[1].close()  # the [::1] listener stops serving; 127.0.0.1 still does
            async with client.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
                assert resp.status == 503 and await resp.text() == "not ready: listener not started\n"


@needs_ipv6
async def test_a_listener_that_cannot_bind_stops_start_and_leaves_nothing_bound():
    port, admin = free_port_on_both_loopbacks(), free_port_on_both_loopbacks()
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", port))
        taken.listen()
        app = ProxyApp(proxy_config(listen=[f"127.0.0.1:{port}", f"[::1]:{port}"], admin=f"127.0.0.1:{admin}"),
                       credentials=static_credentials(), metrics=Metrics())
        with pytest.raises(ListenError) as caught:
            await app.start()
        assert caught.value.strerror == f"cannot listen on [::1]:{port}: Address already in use"
        assert caught.value.errno == errno.EADDRINUSE
        await app.credentials.aclose()
    for bound_before_the_failure in (port, admin):  # both were closed again
        with socket.socket() as again:
            again.bind(("127.0.0.1", bound_before_the_failure))


def test_check_config_prints_every_address_listened_on():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGV4PROXY_")}
    shown = subprocess.run([sys.executable, "-m", "sigv4proxy", "check-config", "--listen", "8080",
                            "--listen", "[fd00:ec2:80::5]:80"], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "listen:\n- 127.0.0.1:8080\n- '[::1]:8080'\n- '[fd00:ec2:80::5]:80'\n" in shown.stdout
    from_env = subprocess.run([sys.executable, "-m", "sigv4proxy", "check-config"], capture_output=True, text=True,
                              timeout=60, env={**env, "SIGV4PROXY_LISTEN": "127.0.0.1:9000,[::1]:9000"})
    assert "listen:\n- 127.0.0.1:9000\n- '[::1]:9000'\n" in from_env.stdout
    unbracketed = subprocess.run([sys.executable, "-m", "sigv4proxy", "check-config", "--listen", "::1:8080"],
                                 capture_output=True, text=True, timeout=60, env=env)
    assert unbracketed.returncode == 2
    assert "listen: an IPv6 address goes in brackets, e.g. [::1]:8080" in unbracketed.stderr


def _env() -> dict[str, str]:
    return dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                AWS_SESSION_TOKEN=SESSION_TOKEN, AWS_EC2_METADATA_DISABLED="true")


@needs_ipv6
def test_serve_names_the_address_it_cannot_bind():
    port = free_port_on_both_loopbacks()
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "sigv4proxy", "serve", "--listen", str(port), "--admin", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, env=_env())
    assert result.returncode == 1
    assert f"sigv4proxy: cannot listen on [::1]:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@needs_ipv6
async def test_workers_share_both_listeners(sim):
    port, admin = free_port_on_both_loopbacks(), free_port_on_both_loopbacks()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigv4proxy", "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
         "--listen", f"[::1]:{port}", "--admin", f"127.0.0.1:{admin}",
         "--upstream", f"http://127.0.0.1:{sim.port}", "--upstream-protocol", "h2"],
        env=_env(), stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 30
            ready = 0
            while ready < 4:  # consecutive ready answers: both workers are likely up
                try:
                    async with client.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        ready = ready + 1 if resp.status == 200 else 0
                except aiohttp.ClientConnectionError:
                    ready = 0
                assert proc.poll() is None, "the proxy exited"
                assert time.monotonic() < deadline, "the workers never became ready"
                await asyncio.sleep(0.1)
            echoes = []
            for i in range(8):
                host = "127.0.0.1" if i % 2 else "[::1]"
                echoes.append(await _get(client, f"http://{host}:{port}", f"/w{i}"))
        assert [e["path"] for e in echoes] == [f"/w{i}" for i in range(8)]
        assert all(e["principal"] == PRINCIPAL for e in echoes)
        workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        assert len(workers) == 2
        for pid in workers:  # each worker holds a listener of each family
            assert {("tcp", port), ("tcp6", port)} <= listening_ports(pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-2000:]


# --- in network namespaces: both wildcards, and a host without IPv6 ---

# Runs inside the namespace: the proxy in-process in front of an in-process simulator, both on
# loopback; prints what it bound, what each request got, and the warnings it logged.
IN_NAMESPACE = r"""
import asyncio, json, logging, sys, urllib.request
from sigv4proxy.runtime.app import ListenError, ProxyApp
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.sim.server import SimConfig, start_simulator
from support.proxy import LATTICE_HOST, SERVICE_ARN, proxy_config, static_credentials

warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append({"msg": record.getMessage(), "listen": getattr(record, "listen", None)})
logging.getLogger("sigv4proxy").addHandler(Keep(logging.WARNING))

def fetch(url):
    request = urllib.request.Request(url, headers={"Host": LATTICE_HOST})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())["principal"]
    except OSError as exc:
        return f"error: {exc}"

async def main(listen, urls, identities):
    sim = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=identities, policy=None,
                                          service_arn=SERVICE_ARN))
    out = {}
    try:
        app = ProxyApp(proxy_config(listen=listen, upstream=f"http://127.0.0.1:{sim.port}"),
                       credentials=static_credentials(), metrics=Metrics())
        try:
            await app.start()
        except ListenError as exc:
            out["error"] = exc.strerror
            await app.credentials.aclose()
            return out
        try:
            out["bound"] = [list(a) for a in app.addresses]
            out["ready"] = app.readiness()[0]
            out["principals"] = [await asyncio.to_thread(fetch, url) for url in urls]
        finally:
            await app.stop(drain_timeout=2)
    finally:
        await sim.aclose()
    return out

listen, urls, identities = json.loads(sys.argv[1])
result = asyncio.run(asyncio.wait_for(main(listen, urls, identities), 30))
result["warnings"] = warnings
print(json.dumps(result))
"""


def _in_namespace(tmp_path, *, ipv6: bool, listen, urls) -> dict:
    ok, reason = have_netns_support()
    if not ok:
        pytest.skip(f"network-namespace test skipped: {reason}")
    from support.proxy import write_identities

    identities = str(write_identities(tmp_path))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    with netns("listen", ipv6=ipv6) as ns:
        result = run_in_netns(ns, [sys.executable, "-c", IN_NAMESPACE, json.dumps([listen, urls, identities])],
                              timeout=60, env={**os.environ, "PYTHONPATH": tests_dir,
                                               "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_colon_port_listens_on_both_wildcards(tmp_path):
    # `:8080` (the Go sidecar's form) is 0.0.0.0 and [::], side by side on one port: each IPv6
    # socket is IPv6-only, so the two never collide.
    out = _in_namespace(tmp_path, ipv6=True, listen=":8080",
                        urls=["http://127.0.0.1:8080/a", "http://[::1]:8080/b"])
    assert "error" not in out, out
    assert out["bound"] == [["0.0.0.0", 8080], ["::", 8080]] and out["ready"] is True
    assert out["principals"] == [PRINCIPAL, PRINCIPAL]
    assert out["warnings"] == []


def test_without_ipv6_the_default_serves_ipv4_and_warns(tmp_path):
    # A pod with IPv6 disabled: no client there can reach [::1], so that listener is skipped.
    out = _in_namespace(tmp_path, ipv6=False, listen=["127.0.0.1:8080", "[::1]:8080"],
                        urls=["http://127.0.0.1:8080/a"])
    assert "error" not in out, out
    assert out["bound"] == [["127.0.0.1", 8080]] and out["ready"] is True
    assert out["principals"] == [PRINCIPAL]
    assert out["warnings"] == [{"msg": "IPv6 listener skipped: this host has no IPv6", "listen": "[::1]:8080"}]


def test_without_ipv6_an_ipv6_only_listen_is_an_error(tmp_path):
    out = _in_namespace(tmp_path, ipv6=False, listen=["[::1]:8080"], urls=[])
    assert out["error"] == "no listen address could be bound"
