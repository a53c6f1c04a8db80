"""The transparent-mode nat rules: generation (pure) for both address families, the idempotent
plan, the CLI, and — as root with ip, iptables and ip6tables — applying, listing, re-applying and
removing them in a throwaway network namespace (with IPv6 on, off, or without ip6tables), plus real
IPv4 and IPv6 redirects that exempt the proxy's uid."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from sigv4proxy.tools.iptables import (
    InvalidRuleSpec,
    IptablesError,
    RuleSpec,
    family_specs,
    ipv6_enabled,
    nat_rules,
    plan,
    removal_rules,
    run_plan,
)
from support.netns import have_netns_support, netns, run_in_netns

NAT = ["iptables", "-t", "nat"]
NAT6 = ["ip6tables", "-t", "nat"]
CHAIN = "SIGV4PROXY_OUTPUT"
V4, V6 = "169.254.171.0/24", "fd00:ec2:80::/64"  # Lattice's ranges, written out independently


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigv4proxy", "iptables", *args],
                          capture_output=True, text=True, timeout=60, **kwargs)


# --- generation ---

def test_default_rules_exactly_one_set_per_family():
    v4, v6 = family_specs()
    assert nat_rules(v4) == [
        NAT + ["-N", CHAIN],
        NAT + ["-A", CHAIN, "-m", "owner", "--uid-owner", "101", "-j", "RETURN"],
        NAT + ["-A", CHAIN, "-o", "lo", "-j", "RETURN"],
        NAT + ["-A", CHAIN, "-p", "tcp", "-d", V4, "--dport", "80", "-j", "REDIRECT", "--to-ports", "8080"],
        NAT + ["-A", CHAIN, "-p", "tcp", "-d", V4, "--dport", "443", "-j", "REDIRECT", "--to-ports", "8080"],
        NAT + ["-A", "OUTPUT", "-p", "tcp", "-d", V4, "-j", CHAIN],
    ]
    # The same uid and loopback exemptions, ports, chain and jump for fd00:ec2:80::/64.
    assert nat_rules(v6) == [
        NAT6 + ["-N", CHAIN],
        NAT6 + ["-A", CHAIN, "-m", "owner", "--uid-owner", "101", "-j", "RETURN"],
        NAT6 + ["-A", CHAIN, "-o", "lo", "-j", "RETURN"],
        NAT6 + ["-A", CHAIN, "-p", "tcp", "-d", V6, "--dport", "80", "-j", "REDIRECT", "--to-ports", "8080"],
        NAT6 + ["-A", CHAIN, "-p", "tcp", "-d", V6, "--dport", "443", "-j", "REDIRECT", "--to-ports", "8080"],
        NAT6 + ["-A", "OUTPUT", "-p", "tcp", "-d", V6, "-j", CHAIN],
    ]


def test_exemptions_come_before_every_redirect_and_the_jumps_come_last():
    for spec in family_specs([V4, "10.0.0.0/8", V6], ports=(80, 443, 8443)):
        rules = nat_rules(spec)
        joined = [" ".join(rule) for rule in rules]
        uid = next(i for i, r in enumerate(joined) if "--uid-owner 101 -j RETURN" in r)
        loopback = next(i for i, r in enumerate(joined) if "-o lo -j RETURN" in r)
        redirects = [i for i, r in enumerate(joined) if "-j REDIRECT" in r]
        jumps = [i for i, r in enumerate(joined) if " -A OUTPUT " in r]
        assert len(redirects) == 3 * len(spec.destinations) and len(jumps) == len(spec.destinations)
        assert rules[0][3:] == ["-N", CHAIN]
        assert uid < min(redirects) and loopback < min(redirects)
        assert min(jumps) > max(redirects) and max(jumps) == len(rules) - 1


def test_each_destination_goes_to_the_tool_of_its_family():
    v4, v6 = family_specs(["10.20.0.0/16", "fd12:3456::/48", "10.30.0.0/16"], proxy_port=15001,
                          proxy_uid=1337, ports=(8000,), chain="LATTICE", iptables="iptables-legacy",
                          ip6tables="/usr/sbin/ip6tables-legacy")
    assert (v4.family, v4.destinations) == (4, ("10.20.0.0/16", "10.30.0.0/16"))
    assert (v6.family, v6.destinations) == (6, ("fd12:3456::/48",))
    assert all(rule[:3] == ["iptables-legacy", "-t", "nat"] for rule in nat_rules(v4))
    assert all(rule[:3] == ["/usr/sbin/ip6tables-legacy", "-t", "nat"] for rule in nat_rules(v6))
    rules = nat_rules(v4)
    assert ["-m", "owner", "--uid-owner", "1337"] == rules[1][5:9]
    redirect = rules[3]
    assert redirect[4] == "LATTICE"
    assert redirect[redirect.index("-d") + 1] == "10.20.0.0/16"
    assert redirect[redirect.index("--dport") + 1] == "8000"
    assert redirect[redirect.index("--to-ports") + 1] == "15001"
    assert [r[r.index("-d") + 1] for r in rules if "-d" in r] == ["10.20.0.0/16", "10.30.0.0/16"] * 2
    assert len(rules) == 7
    assert [spec.tool for spec in family_specs([V4])] == ["iptables"]  # IPv4 only: no ip6tables
    assert [spec.tool for spec in family_specs([V6])] == ["ip6tables"]


def test_removal_deletes_the_jumps_before_the_chain():
    for spec in family_specs([V4, "10.0.0.0/8", V6]):
        removal = removal_rules(spec)
        assert [rule[3] for rule in removal] == ["-D"] * len(spec.destinations) + ["-F", "-X"]
        # The jumps it deletes are exactly the ones nat_rules adds.
        added = [rule[4:] for rule in nat_rules(spec) if rule[3:5] == ["-A", "OUTPUT"]]
        assert [rule[4:] for rule in removal if rule[3] == "-D"] == added


@pytest.mark.parametrize("kwargs", [
    {"proxy_port": 0}, {"proxy_port": 65536}, {"proxy_port": True}, {"proxy_uid": -1},
    {"proxy_uid": "101"}, {"ports": ()}, {"ports": (80, 80)}, {"ports": (80, 70000)},
    {"destinations": ("not-a-cidr",)}, {"destinations": ("169.254.171.1/24",)},
    {"destinations": ()}, {"destinations": (V4, "169.254.171.0/24")},
    {"destinations": ("fd00::/8",)},  # an IPv6 CIDR in the IPv4 spec
    {"destinations": (V4,), "family": 6}, {"destinations": ("fd00:ec2:80::1/64",), "family": 6},
    {"family": 5}, {"chain": "X" * 29}, {"chain": "OUTPUT"}, {"chain": "bad chain"},
    {"tool": "iptables; rm -rf /"},
])
def test_bad_input_is_a_typed_error(kwargs):
    with pytest.raises(InvalidRuleSpec):
        RuleSpec(**kwargs)


def test_family_specs_needs_a_destination():
    with pytest.raises(InvalidRuleSpec, match="at least one destination"):
        family_specs([])


def test_ipv6_enabled_reads_the_namespaces_addresses(tmp_path):
    listing = tmp_path / "if_inet6"
    listing.write_text("00000000000000000000000000000001 01 80 10 80       lo\n")
    assert ipv6_enabled(str(listing)) is True
    listing.write_text("")  # IPv6 turned off on every interface
    assert ipv6_enabled(str(listing)) is False
    assert ipv6_enabled(str(tmp_path / "absent")) is False  # IPv6 off at boot


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


SPECS = {"ipv4": RuleSpec(), "ipv6": RuleSpec(destinations=(V6, "fd00:1::/64"), tool="ip6tables", family=6)}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_apply_twice_changes_nothing_the_second_time(spec):
    fake = FakeIptables()
    count = len(nat_rules(spec))
    first = run_plan(plan(nat_rules(spec)), runner=fake)
    assert all(line.startswith("done: ") for line in first) and len(first) == count
    assert fake.mutations == count
    second = run_plan(plan(nat_rules(spec)), runner=fake)
    assert all(line.startswith("unchanged: ") for line in second)
    assert fake.mutations == count
    destinations = len(spec.destinations)
    assert len(fake.chains[CHAIN]) == 2 + 2 * destinations and len(fake.chains["OUTPUT"]) == destinations


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_remove_after_apply_leaves_nothing_and_is_idempotent(spec):
    fake = FakeIptables()
    run_plan(plan(nat_rules(spec)), runner=fake)
    run_plan(plan(removal_rules(spec)), runner=fake)
    assert fake.chains == {"OUTPUT": []}
    again = run_plan(plan(removal_rules(spec)), runner=fake)
    assert all(line.startswith("unchanged: ") for line in again)


def test_permission_denied_is_a_clear_error():
    def denied(argv):
        return subprocess.CompletedProcess(argv, 4, "", "iptables v1.8.9 (nf_tables): Could not fetch "
                                           "rule set generation id: Permission denied (you must be root)")
    with pytest.raises(IptablesError, match="not permitted.*CAP_NET_ADMIN"):
        run_plan(plan(nat_rules(RuleSpec())), runner=denied)


def test_missing_iptables_binary_is_a_clear_error(tmp_path):
    with pytest.raises(IptablesError, match="not found"):
        run_plan(plan(nat_rules(RuleSpec(tool=str(tmp_path / "no-such-iptables")))))


def test_a_failing_command_names_itself():
    def broken(argv):
        code = 1 if argv[3] in ("-S", "-C") else 2
        return subprocess.CompletedProcess(argv, code, "", "iptables v1.8.9: Couldn't load target")
    with pytest.raises(IptablesError, match=r"-N SIGV4PROXY_OUTPUT failed: .*Couldn't load target"):
        run_plan(plan(nat_rules(RuleSpec())), runner=broken)


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


def test_cli_prints_both_families_and_ipv6_only_where_the_namespace_has_it():
    result = _cli()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    opening = lines.index('if [ -n "$ipv6" ]; then')
    ipv6_block = lines[opening + 1:lines.index("fi", opening)]
    assert [line for line in lines if line.startswith("ip6tables ")] == []  # all inside the block
    assert len(ipv6_block) == 6 and all(line.startswith("  ip6tables -t nat ") for line in ipv6_block)
    assert ("  ip6tables -t nat -C OUTPUT -p tcp -d fd00:ec2:80::/64 -j SIGV4PROXY_OUTPUT >/dev/null "
            "2>&1 || ip6tables -t nat -A OUTPUT -p tcp -d fd00:ec2:80::/64 -j SIGV4PROXY_OUTPUT") in ipv6_block
    assert sum(line.startswith("iptables -t nat ") for line in lines) == 6
    assert "fd00:ec2:80::/64" not in "".join(line for line in lines if line.startswith("iptables "))


def test_cli_destinations_choose_the_families():
    v4_only = _cli("--destination", "169.254.171.0/24")
    assert v4_only.returncode == 0, v4_only.stderr
    assert "ip6tables" not in v4_only.stdout and "if_inet6" not in v4_only.stdout
    v6_only = _cli("--destination", "fd00:ec2:80::/64", "--ip6tables", "ip6tables-legacy")
    assert v6_only.returncode == 0, v6_only.stderr
    commands = [line.strip() for line in v6_only.stdout.splitlines() if "-t nat" in line]
    assert len(commands) == 6 and all(line.startswith("ip6tables-legacy -t nat ") for line in commands)
    assert "\niptables " not in v6_only.stdout


def test_cli_remove_prints_removal_only():
    result = _cli("--remove")
    assert result.returncode == 0, result.stderr
    assert " -D OUTPUT " in result.stdout and " -X SIGV4PROXY_OUTPUT" in result.stdout
    assert " -A " not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--ports", "80,0"], "port must be an integer in 1-65535"),
    (["--proxy-port", "http"], "--proxy-port"),
    (["--destination", "169.254.171.0/33"], "not a valid CIDR"),
    (["--destination", "fd00:ec2:80::1/64"], "not a valid CIDR"),  # host bits set
    (["--destination", "fd00:ec2:80::/64", "--destination", "fd00:ec2:80:0::/64"], "duplicate destination"),
    (["--ip6tables", "ip6tables -w"], "one word"),
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
EXPECTED_LISTING_6 = [
    "-N SIGV4PROXY_OUTPUT",
    "-A OUTPUT -d fd00:ec2:80::/64 -p tcp -j SIGV4PROXY_OUTPUT",
    "-A SIGV4PROXY_OUTPUT -m owner --uid-owner 101 -j RETURN",
    "-A SIGV4PROXY_OUTPUT -o lo -j RETURN",
    "-A SIGV4PROXY_OUTPUT -d fd00:ec2:80::/64 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080",
    "-A SIGV4PROXY_OUTPUT -d fd00:ec2:80::/64 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 8080",
]


def _netns_or_skip(**kwargs):
    ok, reason = have_netns_support()
    if not ok:
        pytest.skip(f"network-namespace test skipped: {reason}")
    return netns("iptables", **kwargs)


@pytest.fixture
def namespace() -> str:
    with _netns_or_skip() as name:
        yield name


@pytest.fixture
def namespace_without_ipv6() -> str:
    with _netns_or_skip(ipv6=False) as name:
        yield name


def _listing(ns: str, tool: str = "iptables") -> list[str]:
    result = run_in_netns(ns, [tool, "-t", "nat", "-S"])
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if not line.startswith("-P ")]


def _listings(ns: str) -> tuple[list[str], list[str]]:
    return _listing(ns), _listing(ns, "ip6tables")


def _cli_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in_netns(ns, [sys.executable, "-m", "sigv4proxy", "iptables", *args], timeout=60)


def test_apply_list_reapply_and_remove_in_a_namespace(namespace):
    applied = _cli_in(namespace, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert applied.stderr == ""
    assert _listings(namespace) == (EXPECTED_LISTING, EXPECTED_LISTING_6)

    again = _cli_in(namespace, "--apply")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("unchanged: iptables ") == 6
    assert again.stdout.count("unchanged: ip6tables ") == 6 and "done: " not in again.stdout
    assert _listings(namespace) == (EXPECTED_LISTING, EXPECTED_LISTING_6)

    removed = _cli_in(namespace, "--remove", "--apply")
    assert removed.returncode == 0, removed.stderr
    assert _listings(namespace) == ([], [])
    assert _cli_in(namespace, "--remove", "--apply").returncode == 0


def test_printed_script_does_what_apply_does(namespace):
    script = _cli("--ports", "80,443")
    assert script.returncode == 0, script.stderr
    for _ in range(2):  # the script is idempotent too
        ran = run_in_netns(namespace, ["sh"], input=script.stdout)
        assert ran.returncode == 0, ran.stderr
        assert ran.stderr == ""
        assert _listings(namespace) == (EXPECTED_LISTING, EXPECTED_LISTING_6)
    removal = _cli("--remove")
    ran = run_in_netns(namespace, ["sh"], input=removal.stdout)
    assert ran.returncode == 0, ran.stderr
    assert _listings(namespace) == ([], [])


def test_ipv6_off_in_the_namespace_gives_the_ipv4_rules_and_a_warning(namespace_without_ipv6):
    # Nothing in such a pod can reach fd00:ec2:80::/64, so there is nothing to intercept: a
    # warning, not a failed init container.
    ns = namespace_without_ipv6
    applied = _cli_in(ns, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "warning: IPv6 is off in this network namespace" in applied.stderr
    assert "fd00:ec2:80::/64 skipped" in applied.stderr and "Traceback" not in applied.stderr
    assert _listings(ns) == (EXPECTED_LISTING, [])
    assert _cli_in(ns, "--remove", "--apply").returncode == 0
    assert _listings(ns) == ([], [])
    script = run_in_netns(ns, ["sh"], input=_cli().stdout)  # the printed script agrees
    assert script.returncode == 0, script.stderr
    assert "warning: IPv6 is off in this network namespace" in script.stderr
    assert _listings(ns) == (EXPECTED_LISTING, [])


def test_missing_ip6tables_where_ipv6_is_on_is_an_error_and_changes_nothing(namespace, tmp_path):
    # IPv6 requests would leave unsigned: refuse, before touching either family's rules.
    missing = str(tmp_path / "no-such-ip6tables")
    applied = _cli_in(namespace, "--apply", "--ip6tables", missing)
    assert applied.returncode == 1
    assert f"{missing} not found" in applied.stderr and "--ip6tables PATH" in applied.stderr
    assert "--destination with IPv4 CIDRs only" in applied.stderr and "Traceback" not in applied.stderr
    assert applied.stdout == ""
    assert _listings(namespace) == ([], [])
    script = run_in_netns(namespace, ["sh"], input=_cli("--ip6tables", missing).stdout)
    assert script.returncode == 1 and f"{missing} not found" in script.stderr
    assert _listings(namespace) == ([], [])
    # The way out it names: IPv4 CIDRs only.
    v4_only = _cli_in(namespace, "--apply", "--ip6tables", missing, "--destination", V4)
    assert v4_only.returncode == 0, v4_only.stderr
    assert _listings(namespace) == (EXPECTED_LISTING, [])


def test_apply_as_non_root_is_refused_clearly(namespace):
    # `ip netns exec` itself needs root, so privileges are dropped inside the namespace, after
    # the imports (the interpreter may live where uid 101 cannot read, e.g. under /root).
    drop_and_apply = ("import os, sys; from sigv4proxy.tools.cli import build_parser; "
                      "args = build_parser().parse_args(['iptables', '--apply']); "
                      "os.setgroups([]); os.setgid(101); os.setuid(101); "
                      "sys.exit(args.func(args))")
    result = run_in_netns(namespace, [sys.executable, "-c", drop_and_apply])
    assert result.returncode == 1
    assert "not permitted" in result.stderr and "Traceback" not in result.stderr


# Runs as root inside the namespace: a stand-in proxy on one port of 127.0.0.1 and ::1, the
# generated rules for both families, one connection per family as root (must be redirected) and
# one per family as uid 101 (must not be).
REDIRECT_SCRIPT = r"""
import json, os, socket, subprocess, sys
from sigv4proxy.tools.cli import main
from sigv4proxy.io.original_dst import original_destination

LATTICE = {"4": ("169.254.171.9", 80), "6": ("fd00:ec2:80::9", 80)}


def connect_as_uid_101(address) -> str:
    # Forked, not a new interpreter: uid 101 may not be able to read the interpreter's files.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setgid(101); os.setuid(101)
            try:
                socket.create_connection(address, timeout=1.5).close()
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


proxies = {"4": socket.socket(socket.AF_INET), "6": socket.socket(socket.AF_INET6)}
proxies["6"].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
proxies["4"].bind(("127.0.0.1", 0))
port = proxies["4"].getsockname()[1]
proxies["6"].bind(("::1", port))  # a fresh namespace: the port is free on ::1 too
for proxy in proxies.values():
    proxy.listen(8)
    proxy.settimeout(5)
out = {"apply_rc": main(["iptables", "--apply", "--proxy-port", str(port)])}
for family, address in LATTICE.items():
    client = socket.create_connection(address, timeout=5)
    conn, _ = proxies[family].accept()
    out["root_original_" + family] = original_destination(conn)
    conn.close()
    client.close()
    out["uid101_" + family] = connect_as_uid_101(address)
out["proxy_saw_uid101"] = False
for proxy in proxies.values():
    proxy.settimeout(0.2)
    try:
        proxy.accept()[0].close()
        out["proxy_saw_uid101"] = True
    except socket.timeout:
        pass
for family, tool in (("4", "iptables"), ("6", "ip6tables")):
    counters = subprocess.run([tool, "-t", "nat", "-L", "SIGV4PROXY_OUTPUT", "-v", "-n", "-x"],
                              capture_output=True, text=True, timeout=20).stdout
    out["uid_rule_packets_" + family] = int(next(
        l for l in counters.splitlines() if "owner UID match 101" in l).split()[0])
print(json.dumps(out))
"""


def test_generated_rules_redirect_the_app_but_not_the_proxy_uid(namespace):
    # A Lattice-like route that leaves through a veth (never loopback), as in a pod.
    for argv in (["ip", "link", "add", "lat0", "type", "veth", "peer", "name", "lat1"],
                 ["ip", "addr", "add", "169.254.171.1/24", "dev", "lat0"],
                 ["ip", "addr", "add", "fd00:ec2:80::1/64", "dev", "lat0", "nodad"],
                 ["ip", "link", "set", "lat0", "up"], ["ip", "link", "set", "lat1", "up"]):
        step = run_in_netns(namespace, argv)
        if step.returncode != 0 and argv[2] == "add" and argv[3] == "lat0":
            pytest.skip(f"cannot create a veth pair in the namespace: {step.stderr.strip()}")
        assert step.returncode == 0, step.stderr
    result = run_in_netns(namespace, [sys.executable, "-c", REDIRECT_SCRIPT], timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["apply_rc"] == 0
    assert out["root_original_4"] == ["169.254.171.9", 80]
    assert out["root_original_6"] == ["fd00:ec2:80::9", 80]
    # uid 101 left through the veth (nobody answers there) instead of reaching the proxy.
    assert out["uid101_4"] == "timeout"
    assert out["uid101_6"] in ("timeout", f"error {errno.EHOSTUNREACH}")  # neighbour discovery gave up
    assert out["proxy_saw_uid101"] is False
    assert out["uid_rule_packets_4"] >= 1 and out["uid_rule_packets_6"] >= 1
