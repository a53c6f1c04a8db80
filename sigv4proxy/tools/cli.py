"""The `sigv4proxy` command line: one subcommand per module.

Owns: argument dispatch, after refusing libraries outside the ranges the compat modules were
tested against (exit 2, as for a bad config). Each command module exposes `register(subparsers)`,
which adds its parser and sets `func` (called with the parsed args; its return value is the exit
code). A command line that names a command imports only that command's module: `serve` starting
in a pod does not pay for the simulator's or `call`'s imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each command and the module whose register(subparsers) adds it (tests/test_cli.py checks this
# against what the modules register).
COMMANDS: dict[str, str] = {
    "serve": "sigv4proxy.runtime.serve",
    "check-config": "sigv4proxy.runtime.serve",
    "call": "sigv4proxy.tools.call",
    "demo": "sigv4proxy.tools.demo",
    "iptables": "sigv4proxy.tools.iptables",
    "sim": "sigv4proxy.sim.cli",
    "policy": "sigv4proxy.sim.cli",
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or (`command` known) only its module's."""
    parser = argparse.ArgumentParser(prog="sigv4proxy", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from sigv4proxy.compat import versions

    try:
        versions.check_all()
    except versions.UnsupportedVersion as exc:
        print(f"sigv4proxy: {exc}", file=sys.stderr)
        return 2
    from sigv4proxy.tools import go_flags

    if go_flags.looks_like_go_flags(argv):
        # A manifest written for the Go aws-sigv4-proxy: run `serve` with translated flags.
        from sigv4proxy.runtime import serve

        return serve.run_with_flags(go_flags.translate(argv))
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
