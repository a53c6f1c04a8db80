"""The `sigv4proxy` command line: one subcommand per module.

Owns: argument dispatch only. Each command module exposes `register(subparsers)`, which adds its
parser and sets `func` (called with the parsed args; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide subcommands; each has register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "sigv4proxy.serve",
    "sigv4proxy.call",
    "sigv4proxy.demo",
    "sigv4proxy.iptables",
    "sigv4proxy.sim.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigv4proxy", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from sigv4proxy import compat

    if compat.looks_like_go_flags(argv):
        # A manifest written for the Go aws-sigv4-proxy: run `serve` with translated flags.
        from sigv4proxy import serve

        return serve.run_with_flags(compat.translate(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
