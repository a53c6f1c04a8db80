"""`sigv4proxy policy check` and `sigv4proxy sim` as real subprocesses: output, exit codes, shutdown."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from importlib import resources

import pytest

DEMO_DIR = resources.files("sigv4proxy") / "demo"
DEMO_POLICY = str(DEMO_DIR / "auth-policy.json")
DEMO_IDENTITIES = str(DEMO_DIR / "identities.json")
DEMO_PRINCIPAL = "arn:aws:sts::111122223333:assumed-role/demo-app/sigv4proxy"
DEMO_SVC = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123456789abcdef0"


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sigv4proxy", *args], capture_output=True, text=True, timeout=timeout)


def check(*args: str) -> subprocess.CompletedProcess:
    return cli("policy", "check", DEMO_POLICY, "--identities", DEMO_IDENTITIES, "--service-arn", DEMO_SVC, *args)


def test_demo_files_ship_in_the_package_and_are_consistent():
    identities = json.loads((DEMO_DIR / "identities.json").read_text())["identities"]
    assert len(identities) == 1 and identities[0]["principal"] == DEMO_PRINCIPAL
    assert identities[0]["org_id"] == "o-demo" and identities[0]["session_token"]
    policy = json.loads((DEMO_DIR / "auth-policy.json").read_text())
    assert {s["Sid"] for s in policy["Statement"]} == {"AllowDemoAppInvoke", "DenyAdminDeletes"}


def test_policy_check_allow():
    out = check("--principal", DEMO_PRINCIPAL, "--method", "GET", "--path", "/hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "ALLOW (statement AllowDemoAppInvoke: allow)"


def test_policy_check_explicit_deny():
    out = check("--principal", DEMO_PRINCIPAL, "--method", "DELETE", "--path", "/admin/users")
    assert out.returncode == 1
    first, second = out.stdout.splitlines()[:2]
    assert first == "DENY (statement DenyAdminDeletes: explicit_deny)"
    assert second == (f"User: {DEMO_PRINCIPAL} is not authorized to perform: vpc-lattice-svcs:Invoke on resource: "
                      f"{DEMO_SVC}/admin/users with an explicit deny in a service-based policy")


def test_policy_check_default_deny_for_other_principal_and_anonymous():
    other = check("--principal", "arn:aws:sts::444455556666:assumed-role/x/y", "--method", "GET", "--path", "/")
    assert other.returncode == 1 and other.stdout.startswith("DENY (no statement: no_allow)")
    anon = check("--principal", "anonymous", "--method", "GET", "--path", "/")
    assert anon.returncode == 1 and "User: anonymous" in anon.stdout


def test_policy_check_headers_and_queries(tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"Statement": [{
        "Sid": "TenantRed", "Effect": "Allow", "Principal": "*", "Action": "vpc-lattice-svcs:Invoke", "Resource": "*",
        "Condition": {"StringEquals": {"vpc-lattice-svcs:RequestHeader/x-tenant": "acme",
                                       "vpc-lattice-svcs:RequestQueryString/color": "red"}}}]}))
    base = ["policy", "check", str(policy), "--principal", DEMO_PRINCIPAL, "--method", "GET", "--path", "/"]
    assert cli(*base, "--header", "X-Tenant=acme", "--query", "color=red").returncode == 0
    assert cli(*base, "--header", "X-Tenant=acme", "--query", "color=blue").returncode == 1


def test_policy_check_bad_policy_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", '
                   '"Condition": {"StringSorta": {"k": "v"}}}]}')
    out = cli("policy", "check", str(bad), "--principal", "anonymous", "--method", "GET", "--path", "/")
    assert out.returncode == 2 and "unsupported condition operator 'StringSorta'" in out.stderr
    missing = cli("policy", "check", str(tmp_path / "nope.json"), "--principal", "anonymous", "--method", "GET",
                  "--path", "/")
    assert missing.returncode == 2 and "cannot read policy file" in missing.stderr


def test_sim_command_serves_until_sigterm_and_logs_without_secrets(tmp_path):
    log = tmp_path / "access.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigv4proxy", "sim", "--listen", "127.0.0.1:0", "--identities", DEMO_IDENTITIES,
         "--policy", DEMO_POLICY, "--service-arn", DEMO_SVC, "--access-log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # blocks until the banner (or EOF if it failed)
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line + proc.stderr.read()
        port = int(match.group(1))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/hello", headers={"Host": "demo.example"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 403 and info.value.headers["x-amzn-errortype"] == "AccessDeniedException"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0 and "stopped" in err
    record = json.loads(log.read_text().splitlines()[0])
    assert record["responseCode"] == 403 and record["requestPath"] == "/hello"
    secret = json.loads((DEMO_DIR / "identities.json").read_text())["identities"][0]["secret_access_key"]
    assert secret not in log.read_text()


def test_sim_command_rejects_bad_identities(tmp_path):
    bad = tmp_path / "ids.json"
    bad.write_text(json.dumps({"identities": [{"access_key_id": "A"}]}))
    out = cli("sim", "--listen", "127.0.0.1:0", "--identities", str(bad))
    assert out.returncode == 2 and "'secret_access_key' must be a non-empty string" in out.stderr


def _free_port(family: int, host: str) -> int:
    import socket

    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_demo_on_an_ipv6_listener_prints_a_url_that_works():
    # An IPv6 pod's app calls http://[::1]:PORT/: the Host is an IPv6 literal, which the demo's
    # path route serves; the banner's curl line quotes the URL (curl would read [::1] as a glob).
    import socket

    try:
        port = _free_port(socket.AF_INET6, "::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback on this machine: {exc}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigv4proxy", "demo", "--listen", f"[::1]:{port}",
         "--admin", f"127.0.0.1:{_free_port(socket.AF_INET, '127.0.0.1')}",
         "--sim-listen", f"127.0.0.1:{_free_port(socket.AF_INET, '127.0.0.1')}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = ""
        for _ in range(20):  # a few lines, the last one about bypassing the proxy
            line = proc.stdout.readline()
            banner += line
            if not line or "bypassing the proxy" in line:
                break
        match = re.search(r"curl '(http://\[::1\]:\d+/hello)'", banner)
        url = match.group(1) if match else banner
        assert url == f"http://[::1]:{port}/hello"
        with urllib.request.urlopen(url, timeout=10) as resp:
            echo = json.loads(resp.read())
        assert resp.status == 200 and echo["principal"] == DEMO_PRINCIPAL
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0


def test_sim_command_limits_flags_close_idle_connections_and_report_them():
    import socket

    proc = subprocess.Popen(
        [sys.executable, "-m", "sigv4proxy", "sim", "--listen", "127.0.0.1:0", "--identities", DEMO_IDENTITIES,
         "--idle-timeout", "0.3", "--max-connection-age", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner + proc.stderr.read()
        assert "idle close 0.3 s, max connection age 30 s" in banner
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: demo.example\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):  # the 403, then the idle close ends the loop
                received += chunk
        assert received.startswith(b"HTTP/1.1 403 ") and b"connection: close" not in received.lower()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0
    assert 'connections closed at its limits: {"HTTP/1.1":{"idle":1}}' in err


@pytest.mark.parametrize("flag, value", [("--idle-timeout", "-1"), ("--max-connection-age", "soon")])
def test_sim_command_rejects_bad_limits(flag, value):
    out = cli("sim", "--identities", DEMO_IDENTITIES, flag, value)
    assert out.returncode == 2 and "expected seconds" in out.stderr
