"""Upstream DNS with a resolver the test controls: each new upstream connection resolves its host
afresh, and a failed lookup is a 502 of its own kind (`upstream_dns`).

Everything runs in a throwaway network namespace whose /etc/resolv.conf (bind-mounted by `ip
netns exec` from /etc/netns/<ns>/) names a tiny DNS server on the namespace's loopback
(support/dns_server.py, answers read from a file the test rewrites, TTL 0). Two simulators listen
on the same port at 127.0.0.2 (A) and 127.0.0.3 (B), closing connections idle for 0.5 s as Lattice
does after 60 s; the proxy's `--upstream` is http://svc.sim.test:8081. The name first resolves to A;
then the answer changes to B and, once A has closed the pooled connection, the next request goes
to B over a new connection while A still listens (an address kept from before would reach A).
Then the name stops resolving: NXDOMAIN and SERVFAIL each give the 502 with their reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Iterator

import pytest

from support.netns import NetnsError, netns, netns_etc_file, popen_in_netns, run_in_netns, tool
from support.proxy import ACCESS_KEY, LATTICE_HOST, SECRET_KEY, SERVICE_ARN, SESSION_TOKEN, write_identities
from support.sim_process import sim_process

NAME = "svc.sim.test"
SIM_PORT = 8081
PROXY = "127.0.0.1:8080"
SIM_IDLE = 0.5
DNS_SERVER = pathlib.Path(__file__).parent / "support" / "dns_server.py"

# Runs in the namespace: one request through the proxy (waiting up to 20 s for it to listen).
CLIENT = r"""
import http.client, json, sys, time
host, port = sys.argv[1].split(":")
for _ in range(200):
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        conn.request("GET", sys.argv[2], headers={"Host": sys.argv[3]})
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
resp = conn.getresponse()
print(json.dumps({"status": resp.status, "kind": resp.getheader("x-sigv4proxy-error"),
                  "body": resp.read().decode("utf-8", "replace")}))
"""


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create a network namespace and /etc/netns/<ns>/resolv.conf"
    if tool("ip") is None:
        return "needs iproute2 (`ip netns`): scripts/ci-deps.sh installs it"
    return None


def request(ns: str, path: str) -> dict:
    ran = run_in_netns(ns, [sys.executable, "-c", CLIENT, PROXY, path, LATTICE_HOST], timeout=60)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


def lookups(log: pathlib.Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line == f"A {NAME}") if log.exists() else 0


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace whose resolver is 127.0.0.1 (the test's DNS server), or a skip saying why not."""
    reason = _skip_reason()
    if reason:
        pytest.skip(f"upstream DNS test skipped: {reason}")
    with contextlib.ExitStack() as stack:
        try:
            name = stack.enter_context(netns("dns"))
        except NetnsError as exc:
            pytest.skip(f"upstream DNS test skipped: cannot create a network namespace here: {exc}")
        stack.enter_context(netns_etc_file(name, "resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"))
        yield name


def stopped_on_exit(stack: contextlib.ExitStack, proc: subprocess.Popen) -> subprocess.Popen:
    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
    stack.callback(stop)
    return proc


@pytest.mark.parametrize("protocol", ["http1", "h2"])
def test_each_new_upstream_connection_resolves_afresh_and_failures_are_upstream_dns(tmp_path, ns, protocol):
    answers, query_log = tmp_path / "answers.json", tmp_path / "queries.log"
    answers.write_text(json.dumps({NAME: "127.0.0.2"}))
    sim = ("--identities", str(write_identities(tmp_path)), "--service-arn", SERVICE_ARN,
           "--idle-timeout", str(SIM_IDLE))
    env = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": SESSION_TOKEN,
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    in_ns = functools.partial(popen_in_netns, ns)
    with contextlib.ExitStack() as stack:
        dns = stopped_on_exit(stack, in_ns([sys.executable, str(DNS_SERVER), "--listen", "127.0.0.1:53",
                                            "--answers", str(answers), "--log", str(query_log)],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        assert dns.stdout.readline().strip() == "dns listening"
        a = stack.enter_context(sim_process(tmp_path, "--listen", f"127.0.0.2:{SIM_PORT}", *sim, name="sim-a",
                                            popen=in_ns))
        b = stack.enter_context(sim_process(tmp_path, "--listen", f"127.0.0.3:{SIM_PORT}", *sim, name="sim-b",
                                            popen=in_ns))
        with open(tmp_path / "proxy.log", "wb") as log:
            proxy = stopped_on_exit(stack, in_ns(
                [sys.executable, "-m", "sigv4proxy", "serve", "--listen", PROXY, "--admin", "127.0.0.1:9901",
                 "--upstream", f"http://{NAME}:{SIM_PORT}", "--upstream-protocol", protocol],
                env=env, stdout=log, stderr=log))
        first = request(ns, "/first")
        answers.write_text(json.dumps({NAME: "127.0.0.3"}))
        time.sleep(SIM_IDLE + 1.0)  # A closes the pooled connection at its idle limit; the proxy sees it
        second = request(ns, "/second")
        answers.write_text(json.dumps({}))
        time.sleep(SIM_IDLE + 1.0)  # and B its own
        nxdomain = request(ns, "/nxdomain")
        answers.write_text(json.dumps({NAME: "SERVFAIL"}))
        servfail = request(ns, "/servfail")
        assert proxy.poll() is None, "the proxy died"
        a_closes = a.stop()
        a_paths, b_paths = [r["requestPath"] for r in a.records()], [r["requestPath"] for r in b.records()]
    assert first["status"] == 200 and second["status"] == 200, (first, second)
    assert a_paths == ["/first"] and b_paths == ["/second"]  # the new connection followed the answer
    wire = "HTTP/2" if protocol == "h2" else "HTTP/1.1"
    assert a_closes == {wire: {"idle": 1}}  # and A was still listening: only a fresh lookup led to B
    assert lookups(query_log) >= 4  # one per new connection: A, B, then the two failed lookups
    assert (nxdomain["status"], nxdomain["kind"]) == (502, "upstream_dns"), nxdomain
    assert "upstream host name not found (DNS)" in nxdomain["body"] and NAME not in nxdomain["body"]
    assert (servfail["status"], servfail["kind"]) == (502, "upstream_dns"), servfail
    assert "lookup failed for now" in servfail["body"]
