"""Drop-in flags of the Go awslabs aws-sigv4-proxy, mapped onto our own settings.

Owns: translating an existing manifest's argument line (`--name vpc-lattice-svcs --region R
--host H --port :8005 --upstream-url-scheme http --unsigned-payload`) into `ProxyConfig` flags.
`sigv4proxy --name ...` (flags with no subcommand) runs `serve` with the translation.
Must never: silently ignore a flag that changes security (all Go flags are mapped or rejected).
"""

from __future__ import annotations

import argparse
import re

# Go flag → our setting (documented in docs/guide.md's drop-in table).
GO_FLAGS = {
    "--name": "service",
    "--region": "region",
    "--host": "route (catch-all to the host)",
    "--sign-host": "route sign_host",
    "--port": "listen",
    "--upstream-url-scheme": "route scheme",
    "--unsigned-payload": "(always on: bodies stream unsigned)",
    "--role-arn": "role_arn",
    "--strip/-s": "strip_header",
    "--custom-headers": "add_header",
    "--duplicate-headers": "duplicate_header",
    "--no-verify-ssl": "verify_tls=false",
    "-v/--verbose": "log_level=debug",
    "--log-failed-requests": "access_log",
    "--transport.idle-conn-timeout": "idle_timeout",
}


def _duration(text: str) -> float:
    """Go durations: 40s, 1m30s, 500ms, 2h."""
    total, pos = 0.0, 0
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    for match in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise argparse.ArgumentTypeError(f"not a Go duration: {text!r}")
    return total


def go_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sigv4proxy", add_help=False, description="aws-sigv4-proxy compatible flags")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--log-failed-requests", action="store_true")
    p.add_argument("--log-signing-process", action="store_true")
    p.add_argument("--unsigned-payload", action="store_true")
    p.add_argument("--port", default=":8080")
    p.add_argument("-s", "--strip", action="append", default=[])
    p.add_argument("--custom-headers", default="")
    p.add_argument("--duplicate-headers", action="append", default=[])
    p.add_argument("--role-arn")
    p.add_argument("--name")
    p.add_argument("--sign-host")
    p.add_argument("--host")
    p.add_argument("--region")
    p.add_argument("--upstream-url-scheme", default="https", choices=("http", "https"))
    p.add_argument("--no-verify-ssl", action="store_true")
    p.add_argument("--transport.idle-conn-timeout", dest="idle_conn_timeout", type=_duration)
    return p


def translate(argv: list[str]) -> dict:
    """Go sidecar arguments → our config flags (a dict for `config.from_sources`)."""
    args = go_parser().parse_args(argv)
    flags: dict = {"listen": args.port}
    if args.name:
        flags["service"] = args.name
    if args.region:
        flags["region"] = args.region
    if args.host:
        # As in the Go sidecar, --host fixes the upstream and the host that is signed, so the
        # app's own Host no longer matters; the configured host is the only one admitted.
        route = f"/={args.upstream_url_scheme}://{args.host},name=host"
        if args.sign_host:
            route += f",sign_host={args.sign_host}"
        flags["route"] = [route]
    elif args.sign_host:
        raise SystemExit("sigv4proxy: --sign-host needs --host")
    if args.role_arn:
        flags["role_arn"] = args.role_arn
    if args.strip:
        flags["strip_header"] = args.strip
    if args.custom_headers:
        flags["add_header"] = [args.custom_headers]
    if args.duplicate_headers:
        flags["duplicate_header"] = args.duplicate_headers
    if args.no_verify_ssl:
        flags["verify_tls"] = False
    if args.verbose:
        flags["log_level"] = "debug"
    if args.log_failed_requests:
        flags["access_log"] = True
    if args.idle_conn_timeout:
        flags["idle_timeout"] = args.idle_conn_timeout
    return flags


def looks_like_go_flags(argv: list[str]) -> bool:
    return bool(argv) and argv[0].startswith("-") and argv[0] not in ("-h", "--help")
