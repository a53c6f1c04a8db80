"""The `iptables` subcommand: nat rules that send a pod's Lattice traffic into the proxy.

Owns: generating the transparent-mode rules (pure: argv lists), rendering them as an idempotent
shell script, and applying/removing them with `-C`/`-S` checks first so a re-run is harmless.

Intended use: an init container (root, NET_ADMIN) runs `sigv4proxy iptables --apply` before the
proxy starts. The app then calls `http://<service>.vpc-lattice-svcs.<region>.on.aws/...` (plain
HTTP, port 80); the kernel redirects that connection to the proxy, which recovers the original
destination (SO_ORIGINAL_DST), signs the request and forwards it to that destination: port 80 as
plain HTTP (the service's HTTP listener), port 443 over TLS checked against the app's Host. Port 443
is redirected too, but the proxy reads plaintext HTTP there: an app must not start TLS itself, or
its handshake meets an HTTP server. The proxy's own upstream traffic is exempt by uid (`--uid-owner`), so the image's
user id (101) and `--proxy-uid` must agree.

Both of Lattice's data-plane ranges are redirected: 169.254.171.0/24 with iptables and
fd00:ec2:80::/64 with ip6tables (REDIRECT lands on 127.0.0.1 and ::1, so the proxy listens on
both). Where the network namespace has no IPv6 at all, the IPv6 rules are skipped with a warning:
nothing there can reach Lattice over IPv6. Anywhere else a missing or failing ip6tables is an
error, since IPv6 requests would leave unsigned; `--destination` with IPv4 CIDRs only opts out.

Must never: touch any table other than `nat`, any chain other than its own and its jumps from
OUTPUT, or run a command without checking first.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Lattice's data plane: AWS-managed prefix lists com.amazonaws.<region>.vpc-lattice and
# com.amazonaws.<region>.ipv6.vpc-lattice.
LATTICE_IPV4 = "169.254.171.0/24"
LATTICE_IPV6 = "fd00:ec2:80::/64"
LATTICE_DESTINATIONS = (LATTICE_IPV4, LATTICE_IPV6)
DEFAULT_CHAIN = "SIGV4PROXY_OUTPUT"
DEFAULT_TOOLS = {4: "iptables", 6: "ip6tables"}
IF_INET6 = "/proc/net/if_inet6"  # the namespace's IPv6 addresses; empty or absent: IPv6 is off
DEFAULT_PORTS = (80, 443)
COMMAND_TIMEOUT_S = 30.0
_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,28}$")  # xtables caps chain names at 28 characters
_PERMISSION_HINTS = ("permission denied", "operation not permitted", "you must be root")


class IptablesError(Exception):
    """Applying or removing the rules failed; the message says what and why."""


class InvalidRuleSpec(ValueError):
    """A port, uid, CIDR or chain name that cannot become a valid rule."""


@dataclass(frozen=True)
class RuleSpec:
    """What to redirect where, for one address family; validated on construction."""

    proxy_port: int = 8080
    proxy_uid: int = 101
    destinations: tuple[str, ...] = (LATTICE_IPV4,)
    ports: tuple[int, ...] = DEFAULT_PORTS
    chain: str = DEFAULT_CHAIN
    tool: str = "iptables"  # iptables or ip6tables, or another binary of the family's
    family: int = 4

    def __post_init__(self) -> None:
        _check_port(self.proxy_port, "proxy port")
        if isinstance(self.proxy_uid, bool) or not isinstance(self.proxy_uid, int):
            raise InvalidRuleSpec(f"proxy uid must be an integer, got {self.proxy_uid!r}")
        if not 0 <= self.proxy_uid <= 0xFFFFFFFE:
            raise InvalidRuleSpec(f"proxy uid out of range: {self.proxy_uid}")
        if not self.ports:
            raise InvalidRuleSpec("at least one port to redirect is required")
        for port in self.ports:
            _check_port(port, "redirected port")
        if len(set(self.ports)) != len(self.ports):
            raise InvalidRuleSpec(f"duplicate port in {list(self.ports)}")
        if self.family not in DEFAULT_TOOLS:
            raise InvalidRuleSpec(f"address family must be 4 or 6, got {self.family!r}")
        if not self.destinations:
            raise InvalidRuleSpec("at least one destination CIDR is required")
        if len(set(self.networks)) != len(self.destinations):
            raise InvalidRuleSpec(f"duplicate destination in {list(self.destinations)}")
        for network in self.networks:
            if ipaddress.ip_network(network).version != self.family:
                raise InvalidRuleSpec(
                    f"destination {network} is not IPv{self.family} "
                    f"({DEFAULT_TOOLS[self.family]} takes IPv{self.family} only)"
                )
        if not _CHAIN_NAME.match(self.chain) or self.chain in ("OUTPUT", "PREROUTING", "INPUT"):
            raise InvalidRuleSpec(f"chain name must be 1-28 of [A-Za-z0-9_-] and not built in: {self.chain!r}")
        if not self.tool or any(ch.isspace() for ch in self.tool):
            raise InvalidRuleSpec(f"{DEFAULT_TOOLS[self.family]} command must be one word: {self.tool!r}")

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(str(_network(d)) for d in self.destinations)


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise InvalidRuleSpec(f"destination is not a valid CIDR: {exc}") from None


def family_specs(
    destinations: Sequence[str] = LATTICE_DESTINATIONS,
    *,
    proxy_port: int = 8080,
    proxy_uid: int = 101,
    ports: Sequence[int] = DEFAULT_PORTS,
    chain: str = DEFAULT_CHAIN,
    iptables: str = "iptables",
    ip6tables: str = "ip6tables",
) -> list[RuleSpec]:
    """One spec per address family among `destinations` (IPv4 first), each CIDR going to the
    tool of its family."""
    if not destinations:
        raise InvalidRuleSpec("at least one destination CIDR is required")
    tools = {4: iptables, 6: ip6tables}
    by_family: dict[int, list[str]] = {}
    for cidr in destinations:
        by_family.setdefault(_network(cidr).version, []).append(cidr)
    return [
        RuleSpec(proxy_port, proxy_uid, tuple(by_family[family]), tuple(ports), chain, tools[family], family)
        for family in sorted(by_family)
    ]


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRuleSpec(f"{what} must be an integer in 1-65535, got {port!r}")


def nat_rules(spec: RuleSpec) -> list[list[str]]:
    """One family's rules in apply order, each a full argv (`iptables -t nat ...`).

    Chain first, then its rules (uid and loopback exemptions before any REDIRECT), then the jumps
    from OUTPUT last, so no packet ever enters a half-built chain.
    """
    nat = [spec.tool, "-t", "nat"]
    rules = [
        nat + ["-N", spec.chain],
        # The proxy's own upstream connections go to the same addresses: never loop them back.
        nat + ["-A", spec.chain, "-m", "owner", "--uid-owner", str(spec.proxy_uid), "-j", "RETURN"],
        nat + ["-A", spec.chain, "-o", "lo", "-j", "RETURN"],
    ]
    for network in spec.networks:
        for port in spec.ports:
            rules.append(
                nat
                + [
                    "-A",
                    spec.chain,
                    "-p",
                    "tcp",
                    "-d",
                    network,
                    "--dport",
                    str(port),
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    str(spec.proxy_port),
                ]
            )
    for network in spec.networks:
        rules.append(nat + ["-A", "OUTPUT", "-p", "tcp", "-d", network, "-j", spec.chain])
    return rules


def removal_rules(spec: RuleSpec) -> list[list[str]]:
    """Undo `nat_rules`: the jumps first (traffic stops entering), then flush and delete the chain."""
    nat = [spec.tool, "-t", "nat"]
    jumps = [nat + ["-D", "OUTPUT", "-p", "tcp", "-d", network, "-j", spec.chain] for network in spec.networks]
    return jumps + [nat + ["-F", spec.chain], nat + ["-X", spec.chain]]


@dataclass(frozen=True)
class Step:
    """Run `check`; run `command` only if the check says it is needed."""

    command: list[str]
    check: list[str]
    run_if_check_succeeds: bool  # False: skip when the rule/chain is already there (apply)


def _check_for(argv: list[str]) -> tuple[list[str], bool]:
    head, op, rest = argv[:3], argv[3], argv[4:]
    if op == "-A":
        return head + ["-C"] + rest, False
    if op == "-D":
        return head + ["-C"] + rest, True
    if op == "-N":
        return head + ["-S"] + rest, False
    if op in ("-F", "-X"):
        return head + ["-S"] + rest, True
    raise InvalidRuleSpec(f"no idempotency check for {op}")


def plan(rules: list[list[str]]) -> list[Step]:
    steps = []
    for argv in rules:
        check, run_if_ok = _check_for(argv)
        steps.append(Step(argv, check, run_if_ok))
    return steps


Section = tuple[RuleSpec, list[Step]]  # one address family's steps


def ipv6_enabled(if_inet6: str = IF_INET6) -> bool:
    """Whether this network namespace has any IPv6 address; none means IPv6 is off here."""
    try:
        with open(if_inet6, "rb") as fh:
            return any(line.strip() for line in fh)
    except FileNotFoundError:  # IPv6 off at boot (ipv6.disable=1) or not built in
        return False
    except OSError:  # cannot tell: assume it is on, so ip6tables has its say
        return True


def _ipv6_off_warning(spec: RuleSpec) -> str:
    return (
        f"warning: IPv6 is off in this network namespace (no address in {IF_INET6}): "
        f"{spec.tool} rules for {', '.join(spec.networks)} skipped; nothing here can reach them"
    )


def _ipv4_only_hint(spec: RuleSpec) -> str:
    return "; to redirect IPv4 only, pass --destination with IPv4 CIDRs only" if spec.family == 6 else ""


def _missing_tool(spec: RuleSpec) -> str:
    flag = "--ip6tables" if spec.family == 6 else "--iptables"
    return (
        f"{spec.tool} not found: install iptables (Debian: apt-get install iptables) "
        f"or name it with {flag} PATH{_ipv4_only_hint(spec)}"
    )


def _shell_step(step: Step) -> str:
    check = f"{shlex.join(step.check)} >/dev/null 2>&1"
    if step.run_if_check_succeeds:  # removal: a failing check must not trip `set -e`
        return f"if {check}; then {shlex.join(step.command)}; fi"
    return f"{check} || {shlex.join(step.command)}"


def render_shell(sections: list[Section], header: str) -> str:
    """An idempotent POSIX sh script doing exactly what `run` does with --apply: IPv6 steps only
    where the namespace has IPv6 (else a warning), every tool found before anything changes."""
    lines = ["#!/bin/sh", f"# {header}", "set -e"]
    ipv6 = [spec for spec, _ in sections if spec.family == 6]
    if ipv6:
        warning = shlex.quote(f"sigv4proxy iptables: {_ipv6_off_warning(ipv6[0])}")
        lines.append(f"ipv6=1; grep -q . {IF_INET6} 2>/dev/null || {{ ipv6=; echo {warning} >&2; }}")
    for spec, _ in sections:
        only_with_ipv6 = '[ -z "$ipv6" ] || ' if spec.family == 6 else ""
        error = shlex.quote(f"sigv4proxy iptables: error: {_missing_tool(spec)}")
        lines.append(
            f"{only_with_ipv6}command -v {shlex.quote(spec.tool)} >/dev/null 2>&1 || {{ echo {error} >&2; exit 1; }}"
        )
    for spec, steps in sections:
        if spec.family == 6:
            lines += ['if [ -n "$ipv6" ]; then', *(f"  {_shell_step(step)}" for step in steps), "fi"]
        else:
            lines += [_shell_step(step) for step in steps]
    return "\n".join(lines) + "\n"


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise IptablesError(
            f"{argv[0]!r} not found on PATH: install iptables (Debian: apt-get install iptables)"
        ) from None
    except PermissionError:
        raise IptablesError(f"{argv[0]!r} is not executable by this user") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{shlex.join(argv)} did not finish in {COMMAND_TIMEOUT_S:.0f}s") from None


def _failure(argv: list[str], result: subprocess.CompletedProcess[str]) -> IptablesError:
    detail = (result.stderr or result.stdout or "").strip().splitlines()
    reason = detail[-1][:300] if detail else f"exit status {result.returncode}"
    if any(hint in reason.lower() for hint in _PERMISSION_HINTS):
        return IptablesError(f"not permitted to change nat rules ({reason}): run as root with CAP_NET_ADMIN")
    return IptablesError(f"{shlex.join(argv)} failed: {reason}")


def run_plan(steps: list[Step], runner: Runner = _run) -> list[str]:
    """Execute the steps; returns one report line per step. Raises IptablesError on failure."""
    report = []
    for step in steps:
        checked = runner(step.check)
        if checked.returncode != 0:
            text = (checked.stderr or "").lower()
            if any(hint in text for hint in _PERMISSION_HINTS):
                raise _failure(step.check, checked)
        needed = (checked.returncode == 0) == step.run_if_check_succeeds
        if not needed:
            report.append(f"unchanged: {shlex.join(step.command)}")
            continue
        result = runner(step.command)
        if result.returncode != 0:
            raise _failure(step.command, result)
        report.append(f"done: {shlex.join(step.command)}")
    return report


# --- command line ---------------------------------------------------------------------------


def _arg(convert: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return convert(text)
        except (ValueError, InvalidRuleSpec) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = convert.__name__
    return parse


def _port(text: str) -> int:
    port = int(text)
    _check_port(port, "port")
    return port


def _ports(text: str) -> tuple[int, ...]:
    return tuple(_port(part.strip()) for part in text.split(",") if part.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "iptables",
        help="print or apply the nat rules for transparent mode",
        description="Print (default) or apply the iptables and ip6tables nat rules that redirect "
        "the pod's TCP traffic to Lattice's ranges into the proxy (which then listens on 127.0.0.1 "
        "and [::1]). Apps then call "
        "http://<service>.vpc-lattice-svcs.<region>.on.aws (plain HTTP); the proxy signs "
        "and forwards to the original destination (port 443 over TLS). Needs root with CAP_NET_ADMIN to --apply.",
    )
    parser.add_argument("--proxy-port", type=_arg(_port), default=8080, help="port the proxy listens on (default 8080)")
    parser.add_argument(
        "--proxy-uid", type=_arg(int), default=101, help="uid the proxy runs as; its traffic is exempt (default 101)"
    )
    parser.add_argument(
        "--destination",
        action="append",
        metavar="CIDR",
        help="CIDR to redirect, repeatable; IPv4 ones go to iptables, IPv6 ones to "
        f"ip6tables (default {LATTICE_IPV4} and {LATTICE_IPV6}, Lattice's ranges)",
    )
    parser.add_argument(
        "--ports",
        type=_arg(_ports),
        default=DEFAULT_PORTS,
        help="comma-separated destination ports to redirect (default 80,443)",
    )
    parser.add_argument("--chain", default=DEFAULT_CHAIN, help=f"chain name (default {DEFAULT_CHAIN})")
    parser.add_argument(
        "--iptables", default="iptables", help="iptables binary, e.g. iptables-legacy (default iptables)"
    )
    parser.add_argument(
        "--ip6tables", default="ip6tables", help="ip6tables binary, e.g. ip6tables-legacy (default ip6tables)"
    )
    parser.add_argument("--apply", action="store_true", help="run the commands instead of printing")
    parser.add_argument(
        "--remove", action="store_true", help="delete the rules and chain instead (printed unless --apply)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        specs = family_specs(
            args.destination or LATTICE_DESTINATIONS,
            proxy_port=args.proxy_port,
            proxy_uid=args.proxy_uid,
            ports=args.ports,
            chain=args.chain,
            iptables=args.iptables,
            ip6tables=args.ip6tables,
        )
    except InvalidRuleSpec as exc:
        print(f"sigv4proxy iptables: error: {exc}", file=sys.stderr)
        return 2
    sections = [(spec, plan(removal_rules(spec) if args.remove else nat_rules(spec))) for spec in specs]
    if not args.apply:
        action = "remove" if args.remove else "apply"
        networks = ", ".join(n for spec in specs for n in spec.networks)
        header = (
            f"sigv4proxy transparent-mode nat rules ({action}) for {networks}; idempotent; "
            f"`sigv4proxy iptables{' --remove' if args.remove else ''} --apply` runs them"
        )
        sys.stdout.write(render_shell(sections, header))
        return 0
    ipv6 = [spec for spec in specs if spec.family == 6]
    if ipv6 and not ipv6_enabled():
        print(f"sigv4proxy iptables: {_ipv6_off_warning(ipv6[0])}", file=sys.stderr)
        sections = [(spec, steps) for spec, steps in sections if spec.family != 6]
    for spec, _ in sections:  # every tool is there before anything changes
        if shutil.which(spec.tool) is None:
            print(f"sigv4proxy iptables: error: {_missing_tool(spec)}", file=sys.stderr)
            return 1
    for spec, steps in sections:
        try:
            for line in run_plan(steps):
                print(line)
        except IptablesError as exc:
            print(f"sigv4proxy iptables: error: {exc}{_ipv4_only_hint(spec)}", file=sys.stderr)
            return 1
    return 0
