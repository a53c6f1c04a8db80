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

Must never: touch any table other than `nat`, any chain other than its own and the single jump from
OUTPUT, or run a command without checking first. IPv4 only (Lattice's link-local range).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

LATTICE_DESTINATION = "169.254.171.0/24"
DEFAULT_CHAIN = "SIGV4PROXY_OUTPUT"
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
    """What to redirect where; validated on construction."""

    proxy_port: int = 8080
    proxy_uid: int = 101
    destination: str = LATTICE_DESTINATION
    ports: tuple[int, ...] = DEFAULT_PORTS
    chain: str = DEFAULT_CHAIN
    iptables: str = "iptables"

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
        try:
            network = ipaddress.ip_network(self.destination, strict=True)
        except ValueError as exc:
            raise InvalidRuleSpec(f"destination is not a valid CIDR: {exc}") from None
        if network.version != 4:
            raise InvalidRuleSpec("destination must be an IPv4 CIDR (iptables, not ip6tables)")
        if not _CHAIN_NAME.match(self.chain) or self.chain in ("OUTPUT", "PREROUTING", "INPUT"):
            raise InvalidRuleSpec(f"chain name must be 1-28 of [A-Za-z0-9_-] and not built in: {self.chain!r}")
        if not self.iptables or any(ch.isspace() for ch in self.iptables):
            raise InvalidRuleSpec(f"iptables command must be one word: {self.iptables!r}")

    @property
    def network(self) -> str:
        return str(ipaddress.ip_network(self.destination))


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRuleSpec(f"{what} must be an integer in 1-65535, got {port!r}")


def nat_rules(
    proxy_port: int = 8080,
    proxy_uid: int = 101,
    destination: str = LATTICE_DESTINATION,
    ports: Sequence[int] = DEFAULT_PORTS,
    chain: str = DEFAULT_CHAIN,
    iptables: str = "iptables",
) -> list[list[str]]:
    """The rules in apply order, each a full argv (`iptables -t nat ...`).

    Chain first, then its rules (uid and loopback exemptions before any REDIRECT), then the jump
    from OUTPUT last, so no packet ever enters a half-built chain.
    """
    spec = RuleSpec(proxy_port, proxy_uid, destination, tuple(ports), chain, iptables)
    return _rules(spec)


def _rules(spec: RuleSpec) -> list[list[str]]:
    nat = [spec.iptables, "-t", "nat"]
    rules = [
        nat + ["-N", spec.chain],
        # The proxy's own upstream connections go to the same addresses: never loop them back.
        nat + ["-A", spec.chain, "-m", "owner", "--uid-owner", str(spec.proxy_uid), "-j", "RETURN"],
        nat + ["-A", spec.chain, "-o", "lo", "-j", "RETURN"],
    ]
    for port in spec.ports:
        rules.append(nat + ["-A", spec.chain, "-p", "tcp", "-d", spec.network, "--dport", str(port),
                            "-j", "REDIRECT", "--to-ports", str(spec.proxy_port)])
    rules.append(nat + ["-A", "OUTPUT", "-p", "tcp", "-d", spec.network, "-j", spec.chain])
    return rules


def removal_rules(spec: RuleSpec) -> list[list[str]]:
    """Undo `_rules`: the jump first (traffic stops entering), then flush and delete the chain."""
    nat = [spec.iptables, "-t", "nat"]
    return [
        nat + ["-D", "OUTPUT", "-p", "tcp", "-d", spec.network, "-j", spec.chain],
        nat + ["-F", spec.chain],
        nat + ["-X", spec.chain],
    ]


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


def render_shell(steps: list[Step], header: str) -> str:
    """An idempotent POSIX sh script doing exactly what `run_plan` does."""
    lines = ["#!/bin/sh", f"# {header}", "set -e"]
    for step in steps:
        check = f"{shlex.join(step.check)} >/dev/null 2>&1"
        if step.run_if_check_succeeds:  # removal: a failing check must not trip `set -e`
            lines.append(f"if {check}; then {shlex.join(step.command)}; fi")
        else:
            lines.append(f"{check} || {shlex.join(step.command)}")
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
        return IptablesError(
            f"not permitted to change nat rules ({reason}): run as root with CAP_NET_ADMIN"
        )
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
        description="Print (default) or apply the iptables nat rules that redirect the pod's "
        "TCP traffic to the Lattice range into the proxy. Apps then call "
        "http://<service>.vpc-lattice-svcs.<region>.on.aws (plain HTTP); the proxy signs "
        "and forwards to the original destination (port 443 over TLS). Needs root with CAP_NET_ADMIN to --apply.",
    )
    parser.add_argument("--proxy-port", type=_arg(_port), default=8080,
                        help="port the proxy listens on (default 8080)")
    parser.add_argument("--proxy-uid", type=_arg(int), default=101,
                        help="uid the proxy runs as; its traffic is exempt (default 101)")
    parser.add_argument("--destination", default=LATTICE_DESTINATION,
                        help=f"IPv4 CIDR to redirect (default {LATTICE_DESTINATION})")
    parser.add_argument("--ports", type=_arg(_ports), default=DEFAULT_PORTS,
                        help="comma-separated destination ports to redirect (default 80,443)")
    parser.add_argument("--chain", default=DEFAULT_CHAIN, help=f"chain name (default {DEFAULT_CHAIN})")
    parser.add_argument("--iptables", default="iptables",
                        help="iptables binary, e.g. iptables-legacy (default iptables)")
    parser.add_argument("--apply", action="store_true", help="run the commands instead of printing")
    parser.add_argument("--remove", action="store_true",
                        help="delete the rules and chain instead (printed unless --apply)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        spec = RuleSpec(args.proxy_port, args.proxy_uid, args.destination, tuple(args.ports),
                        args.chain, args.iptables)
    except InvalidRuleSpec as exc:
        print(f"sigv4proxy iptables: error: {exc}", file=sys.stderr)
        return 2
    steps = plan(removal_rules(spec) if args.remove else _rules(spec))
    if not args.apply:
        action = "remove" if args.remove else "apply"
        header = (f"sigv4proxy transparent-mode nat rules ({action}); "
                  f"idempotent; `sigv4proxy iptables{' --remove' if args.remove else ''} --apply` runs them")
        sys.stdout.write(render_shell(steps, header))
        return 0
    try:
        for line in run_plan(steps):
            print(line)
    except IptablesError as exc:
        print(f"sigv4proxy iptables: error: {exc}", file=sys.stderr)
        return 1
    return 0
