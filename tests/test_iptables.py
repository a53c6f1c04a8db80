"""The transparent-mode nat rules: generation (pure), the idempotent plan, the CLI, and — as root
with ip + iptables — applying, listing, re-applying and removing them in a throwaway network
namespace, plus a real redirect that exempts the proxy's uid."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sigv4proxy.iptables import (
    InvalidRuleSpec,
    IptablesError,
    RuleSpec,
    nat_rules,
    plan,
    removal_rules,
    run_plan,
)
from support.netns import have_netns_support, netns, run_in_netns

NAT = ["iptables", "-t", "nat"]
CHAIN = "SIGV4PROXY_OUTPUT"


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigv4proxy", "iptables", *args],
                          capture_output=True, text=True, timeout=60, **kwargs)


# --- generation ---

def test_default_rules_exactly():
    assert nat_rules() == [
        NAT + ["-N", CHAIN],
        NAT + ["-A", CHAIN, "-m", "owner", "--uid-owner", "101", "-j", "RETURN"],
        NAT + ["-A", CHAIN, "-o", "lo", "-j", "RETURN"],
        NAT + ["-A", CHAIN, "-p", "tcp", "-d", "169.254.171.0/24", "--dport", "80",
               "-j", "REDIRECT", "--to-ports", "8080"],
        NAT + ["-A", CHAIN, "-p", "tcp", "-d", "169.254.171.0/24", "--dport", "443",
               "-j", "REDIRECT", "--to-ports", "8080"],
        NAT + ["-A", "OUTPUT", "-p", "tcp", "-d", "169.254.171.0/24", "-j", CHAIN],
    ]


def test_exemptions_come_before_every_redirect_and_the_jump_comes_last():
    rules = nat_rules(ports=(80, 443, 8443))
    joined = [" ".join(rule) for rule in rules]
    uid = next(i for i, r in enumerate(joined) if "--uid-owner 101 -j RETURN" in r)
    loopback = next(i for i, r in enumerate(joined) if "-o lo -j RETURN" in r)
    redirects = [i for i, r in enumerate(joined) if "-j REDIRECT" in r]
    assert len(redirects) == 3
    assert rules[0][3:] == ["-N", CHAIN]
    assert uid < min(redirects) and loopback < min(redirects)
    assert rules[-1][3:5] == ["-A", "OUTPUT"] and rules[-1][-2:] == ["-j", CHAIN]


def test_parameters_reach_the_rules():
    rules = nat_rules(proxy_port=15001, proxy_uid=1337, destination="10.20.0.0/16", ports=(8000,),
                      chain="LATTICE", iptables="iptables-legacy")
    assert all(rule[:3] == ["iptables-legacy", "-t", "nat"] for rule in rules)
    assert ["-m", "owner", "--uid-owner", "1337"] == rules[1][5:9]
    redirect = rules[3]
    assert redirect[4] == "LATTICE"
    assert redirect[redirect.index("-d") + 1] == "10.20.0.0/16"
    assert redirect[redirect.index("--dport") + 1] == "8000"
    assert redirect[redirect.index("--to-ports") + 1] == "15001"
    assert len(rules) == 5


def test_removal_deletes_the_jump_before_the_chain():
    removal = removal_rules(RuleSpec())
    assert [rule[3] for rule in removal] == ["-D", "-F", "-X"]
    # The jump it deletes is exactly the one nat_rules adds.
    assert removal[0][4:] == nat_rules()[-1][4:]


@pytest.mark.parametrize("kwargs", [
    {"proxy_port": 0}, {"proxy_port": 65536}, {"proxy_port": True}, {"proxy_uid": -1},
    {"proxy_uid": "101"}, {"ports": ()}, {"ports": (80, 80)}, {"ports": (80, 70000)},
    {"destination": "not-a-cidr"}, {"destination": "169.254.171.1/24"},
    {"destination": "fd00::/8"}, {"chain": "X" * 29}, {"chain": "OUTPUT"}, {"chain": "bad chain"},
    {"iptables": "iptables; rm -rf /"},
])
def test_bad_input_is_a_typed_error(kwargs):
    with pytest.raises(InvalidRuleSpec):
        nat_rules(**kwargs)


# --- the idempotent plan, against a fake iptables that keeps state ---

class FakeIptables:
    """Understands -N/-S/-A/-C/-D/-F/-X on the nat table well enough to check the plan's logic."""

    def __init__(self) -> None:
        self.chains: dict[str, list[tuple[str, ...]]] = {"OUTPUT": []}
        self.mutations = 0

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        op, chain, rule = argv[3], argv[4], tuple(argv[5:])
        ok = subprocess.CompletedProcess(argv, 0, "", "")
        missing = subprocess.CompletedProcess(argv, 1, "", "iptables: No chain/target/match by that name.")
        if op == "-S":
            return ok if chain in self.chains else missing
        if op == "-C":
            return ok if rule in self.chains.get(chain, []) else missing
        self.mutations += 1
        if op == "-N":
            self.chains[chain] = []
        elif op == "-A":
            self.chains[chain].append(rule)
        elif op == "-D":
            self.chains[chain].remove(rule)
        elif op == "-F":
            self.chains[chain].clear()
        elif op == "-X":
            del self.chains[chain]
        return ok


def test_apply_twice_changes_nothing_the_second_time():
    fake = FakeIptables()
    first = run_plan(plan(nat_rules()), runner=fake)
    assert all(line.startswith("done: ") for line in first) and len(first) == 6
    assert fake.mutations == 6
    second = run_plan(plan(nat_rules()), runner=fake)
    assert all(line.startswith("unchanged: ") for line in second)
    assert fake.mutations == 6
    assert len(fake.chains[CHAIN]) == 4 and len(fake.chains["OUTPUT"]) == 1


def test_remove_after_apply_leaves_nothing_and_is_idempotent():
    fake = FakeIptables()
    run_plan(plan(nat_rules()), runner=fake)
    run_plan(plan(removal_rules(RuleSpec())), runner=fake)
    assert fake.chains == {"OUTPUT": []}
    again = run_plan(plan(removal_rules(RuleSpec())), runner=fake)
    assert all(line.startswith("unchanged: ") for line in again)


def test_permission_denied_is_a_clear_error():
    def denied(argv):
        return subprocess.CompletedProcess(argv, 4, "", "iptables v1.8.9 (nf_tables): Could not fetch "
                                           "rule set generation id: Permission denied (you must be root)")
    with pytest.raises(IptablesError, match="not permitted.*CAP_NET_ADMIN"):
        run_plan(plan(nat_rules()), runner=denied)


def test_missing_iptables_binary_is_a_clear_error(tmp_path):
    with pytest.raises(IptablesError, match="not found"):
        run_plan(plan(nat_rules(iptables=str(tmp_path / "no-such-iptables"))))


def test_a_failing_command_names_itself():
    def broken(argv):
        code = 1 if argv[3] in ("-S", "-C") else 2
        return subprocess.CompletedProcess(argv, code, "", "iptables v1.8.9: Couldn't load target")
    with pytest.raises(IptablesError, match=r"-N SIGV4PROXY_OUTPUT failed: .*Couldn't load target"):
        run_plan(plan(nat_rules()), runner=broken)


# --- CLI ---

def test_cli_prints_an_idempotent_script_by_default():
    result = _cli("--proxy-port", "15001", "--ports", "80")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "#!/bin/sh" and "set -e" in lines
    assert ("iptables -t nat -C SIGV4PROXY_OUTPUT -p tcp -d 169.254.171.0/24 --dport 80 -j REDIRECT "
            "--to-ports 15001 >/dev/null 2>&1 || iptables -t nat -A SIGV4PROXY_OUTPUT -p tcp -d "
            "169.254.171.0/24 --dport 80 -j REDIRECT --to-ports 15001") in lines
    assert "--dport 443" not in result.stdout


def test_cli_remove_prints_removal_only():
    result = _cli("--remove")
    assert result.returncode == 0, result.stderr
    assert " -D OUTPUT " in result.stdout and " -X SIGV4PROXY_OUTPUT" in result.stdout
    assert " -A " not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--ports", "80,0"], "port must be an integer in 1-65535"),
    (["--proxy-port", "http"], "--proxy-port"),
    (["--destination", "169.254.171.0/33"], "not a valid CIDR"),
    (["--chain", "OUTPUT"], "chain name"),
])
def test_cli_rejects_bad_arguments(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_apply_without_iptables_fails_clearly(tmp_path):
    result = _cli("--apply", "--iptables", str(tmp_path / "no-such-iptables"))
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr


# --- for real, in a network namespace ---

EXPECTED_LISTING = [
    "-N SIGV4PROXY_OUTPUT",
    "-A OUTPUT -d 169.254.171.0/24 -p tcp -j SIGV4PROXY_OUTPUT",
    "-A SIGV4PROXY_OUTPUT -m owner --uid-owner 101 -j RETURN",
    "-A SIGV4PROXY_OUTPUT -o lo -j RETURN",
    "-A SIGV4PROXY_OUTPUT -d 169.254.171.0/24 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080",
    "-A SIGV4PROXY_OUTPUT -d 169.254.171.0/24 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8080",
]


@pytest.fixture
def namespace() -> str:
    ok, reason = have_netns_support()
    if not ok:
        pytest.skip(f"network-namespace test skipped: {reason}")
    with netns("iptables") as name:
        yield name


def _listing(ns: str) -> list[str]:
    result = run_in_netns(ns, ["iptables", "-t", "nat", "-S"])
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if not line.startswith("-P ")]


def _cli_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in_netns(ns, [sys.executable, "-m", "sigv4proxy", "iptables", *args], timeout=60)


def test_apply_list_reapply_and_remove_in_a_namespace(namespace):
    applied = _cli_in(namespace, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert _listing(namespace) == EXPECTED_LISTING

    again = _cli_in(namespace, "--apply")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("unchanged: ") == 6
    assert _listing(namespace) == EXPECTED_LISTING

    removed = _cli_in(namespace, "--remove", "--apply")
    assert removed.returncode == 0, removed.stderr
    assert _listing(namespace) == []
    assert _cli_in(namespace, "--remove", "--apply").returncode == 0


def test_printed_script_does_what_apply_does(namespace):
    script = _cli("--ports", "80,443")
    assert script.returncode == 0, script.stderr
    for _ in range(2):  # the script is idempotent too
        ran = run_in_netns(namespace, ["sh"], input=script.stdout)
        assert ran.returncode == 0, ran.stderr
        assert _listing(namespace) == EXPECTED_LISTING
    removal = _cli("--remove")
    ran = run_in_netns(namespace, ["sh"], input=removal.stdout)
    assert ran.returncode == 0, ran.stderr
    assert _listing(namespace) == []


def test_apply_as_non_root_is_refused_clearly(namespace):
    # `ip netns exec` itself needs root, so privileges are dropped inside the namespace, after
    # the imports (the interpreter may live where uid 101 cannot read, e.g. under /root).
    drop_and_apply = ("import os, sys; from sigv4proxy.cli import build_parser; "
                      "args = build_parser().parse_args(['iptables', '--apply']); "
                      "os.setgroups([]); os.setgid(101); os.setuid(101); "
                      "sys.exit(args.func(args))")
    result = run_in_netns(namespace, [sys.executable, "-c", drop_and_apply])
    assert result.returncode == 1
    assert "not permitted" in result.stderr and "Traceback" not in result.stderr


# Runs as root inside the namespace: a stand-in proxy on an ephemeral port, the generated rules,
# one connection as root (must be redirected) and one as uid 101 (must not be).
REDIRECT_SCRIPT = r"""
import json, os, socket, subprocess, sys
from sigv4proxy.cli import main
from sigv4proxy.original_dst import original_destination


def connect_as_uid_101() -> str:
    # Forked, not a new interpreter: uid 101 may not be able to read the interpreter's files.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setgid(101); os.setuid(101)
            try:
                socket.create_connection(("169.254.171.9", 80), timeout=1.5).close()
                verdict = "connected"
            except socket.timeout:
                verdict = "timeout"
            except OSError as exc:
                verdict = f"error {exc.errno}"
            os.write(write_end, verdict.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


proxy = socket.socket()
proxy.bind(("127.0.0.1", 0))
proxy.listen(8)
proxy.settimeout(5)
port = proxy.getsockname()[1]
out = {"apply_rc": main(["iptables", "--apply", "--proxy-port", str(port)])}
client = socket.create_connection(("169.254.171.9", 80), timeout=5)
conn, _ = proxy.accept()
out["root_original"] = original_destination(conn)
conn.close()
client.close()
out["uid101"] = connect_as_uid_101()
proxy.settimeout(0.2)
try:
    proxy.accept()[0].close()
    out["proxy_saw_uid101"] = True
except socket.timeout:
    out["proxy_saw_uid101"] = False
counters = subprocess.run(["iptables", "-t", "nat", "-L", "SIGV4PROXY_OUTPUT", "-v", "-n", "-x"],
                          capture_output=True, text=True, timeout=20).stdout
out["uid_rule_packets"] = int(next(l for l in counters.splitlines() if "owner UID match 101" in l).split()[0])
print(json.dumps(out))
"""


def test_generated_rules_redirect_the_app_but_not_the_proxy_uid(namespace):
    # A Lattice-like route that leaves through a veth (never loopback), as in a pod.
    for argv in (["ip", "link", "add", "lat0", "type", "veth", "peer", "name", "lat1"],
                 ["ip", "addr", "add", "169.254.171.1/24", "dev", "lat0"],
                 ["ip", "link", "set", "lat0", "up"], ["ip", "link", "set", "lat1", "up"]):
        step = run_in_netns(namespace, argv)
        if step.returncode != 0 and argv[2] == "add" and argv[3] == "lat0":
            pytest.skip(f"cannot create a veth pair in the namespace: {step.stderr.strip()}")
        assert step.returncode == 0, step.stderr
    result = run_in_netns(namespace, [sys.executable, "-c", REDIRECT_SCRIPT], timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["apply_rc"] == 0
    assert out["root_original"] == ["169.254.171.9", 80]
    # uid 101 left through the veth (nobody answers there) instead of reaching the proxy.
    assert out["uid101"] == "timeout"
    assert out["proxy_saw_uid101"] is False
    assert out["uid_rule_packets"] >= 1
