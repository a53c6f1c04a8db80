"""The `sigv4proxy sim` and `sigv4proxy policy check` subcommands.

Owns: their flags and exit codes. `sim` runs the local Lattice simulator until SIGINT/SIGTERM (on
uvloop) and then stops cleanly, printing how many connections it closed at its limits; `policy
check` evaluates an auth policy for one described request (no network) and prints ALLOW/DENY with
the statement that decided it. Must never: print a secret or a session token (only principals, Sids
and reasons are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from sigv4proxy.sim import DEFAULT_SERVICE_ARN, URI_PATH_ESCAPINGS
from sigv4proxy.sim.conditions import PolicyError
from sigv4proxy.sim.identities import IdentitiesError, Identity, IdentityStore
from sigv4proxy.sim.policy import Policy, RequestFacts, denial_message, evaluate


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8081 or [::1]:8081")
    return host.strip("[]"), int(port)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError("expected seconds: 0 (off) or a positive number, e.g. 60 or 0.5")
    return seconds


def _pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return key, val


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser("sim", help="run a local VPC Lattice simulator (SigV4 + auth policy)")
    sim.add_argument("--listen", type=_listen, default=("127.0.0.1", 8081), help="HOST:PORT (default 127.0.0.1:8081)")
    sim.add_argument("--identities", required=True, help="identities JSON file")
    sim.add_argument("--policy", help="auth policy JSON file (default: allow every authenticated caller)")
    sim.add_argument("--service-arn", default=DEFAULT_SERVICE_ARN)
    sim.add_argument("--region", default="us-west-2")
    sim.add_argument(
        "--uri-path-escaping",
        choices=URI_PATH_ESCAPINGS,
        default="double",
        help="verify with the path encoded once more (double, the SigV4 rule) or as it "
        "arrived (single); a request signed the other way gets a 403",
    )
    sim.add_argument("--tls-cert", help="PEM certificate: serve TLS with ALPN h2/http1.1")
    sim.add_argument("--tls-key", help="PEM private key for --tls-cert")
    sim.add_argument("--access-log", help="access-log file, or - for stdout")
    sim.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="close a connection with no request in flight for this long, as Lattice does "
        "(default 60; Lattice allows 60-600; 0: off)",
    )
    sim.add_argument(
        "--max-connection-age",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="retire every connection this long after it opened, as Lattice does after 10 "
        "minutes (default 600; 0: off)",
    )
    sim.set_defaults(func=run_sim)

    policy = subparsers.add_parser("policy", help="auth-policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    check = policy_sub.add_parser("check", help="evaluate a policy for one request (exit 0 allow, 1 deny)")
    check.add_argument("policy_file", metavar="POLICY.json")
    check.add_argument("--principal", required=True, help="caller ARN, or 'anonymous'")
    check.add_argument("--method", required=True)
    check.add_argument("--path", required=True)
    check.add_argument("--header", type=_pair, action="append", default=[], metavar="K=V")
    check.add_argument("--query", type=_pair, action="append", default=[], metavar="K=V")
    check.add_argument("--identities", help="identities JSON (gives the principal's org, account and tags)")
    check.add_argument("--service-arn", default=DEFAULT_SERVICE_ARN)
    check.add_argument("--port", type=int, default=443)
    check.add_argument("--source-ip", default=None)
    check.set_defaults(func=run_policy_check)
    policy.set_defaults(func=lambda args: (policy.print_help(), 2)[1])  # only reached without a subcommand


def _caller(principal: str, identities_file: str | None) -> Identity | None:
    if principal == "anonymous":
        return None
    if identities_file:
        found = IdentityStore.load(identities_file).by_principal(principal)
        if found is not None:
            return found
    # A bare principal: role ARN and account are derived from the ARN.
    from sigv4proxy.sim.identities import identity_from_dict

    return identity_from_dict({"access_key_id": "-", "secret_access_key": "-", "principal": principal}, "--principal")


def run_policy_check(args: argparse.Namespace) -> int:
    try:
        policy = Policy.load(args.policy_file)
        identity = _caller(args.principal, args.identities)
    except (PolicyError, IdentitiesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    facts = RequestFacts(
        method=args.method,
        path=args.path,
        headers=args.header,
        query=args.query,
        port=args.port,
        service_arn=args.service_arn,
        source_ip=args.source_ip,
    )
    decision = evaluate(policy, identity, facts)
    where = f"statement {decision.statement}" if decision.statement else "no statement"
    if decision.allowed:
        print(f"ALLOW ({where}: {decision.reason})")
        return 0
    print(f"DENY ({where}: {decision.reason})")
    print(denial_message(decision, identity.principal if identity else None, args.service_arn + args.path))
    return 1


async def _serve(cfg) -> None:
    from sigv4proxy.sim.server import start_simulator

    server = await start_simulator(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if cfg.tls_cert else "http"
    print(
        f"sigv4proxy sim listening on {scheme}://{server.host}:{server.port} (HTTP/1.1 + h2; "
        f"idle close {cfg.idle_timeout:g} s, max connection age {cfg.max_connection_age:g} s)",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await server.aclose()
        closes = json.dumps(server.close_counts(), separators=(",", ":"))
        print(f"sigv4proxy sim stopped; connections closed at its limits: {closes}", file=sys.stderr, flush=True)


def run_sim(args: argparse.Namespace) -> int:
    # The server (and the h2 library) load only for this command, not for every CLI start.
    from sigv4proxy.sim.server import SimConfig

    host, port = args.listen
    cfg = SimConfig(
        host=host,
        port=port,
        identities=args.identities,
        policy=args.policy,
        service_arn=args.service_arn,
        region=args.region,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        access_log=args.access_log,
        uri_path_escaping=args.uri_path_escaping,
        idle_timeout=args.idle_timeout,
        max_connection_age=args.max_connection_age,
    )
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        runner = asyncio.run  # type: ignore[assignment]
    try:
        runner(_serve(cfg))
    except (PolicyError, IdentitiesError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
