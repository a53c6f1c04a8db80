import subprocess
import sys

from sigv4proxy.tools.cli import build_parser


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sigv4proxy", "--help"], capture_output=True, text=True, check=True)
    assert "usage: sigv4proxy" in out.stdout


def test_every_registered_command_has_a_func():
    parser = build_parser()
    sub = [a for a in parser._actions if a.dest == "command"]
    for name, subparser in (sub[0].choices.items() if sub and sub[0].choices else []):
        assert subparser.get_default("func") is not None, name


def test_command_table_names_the_module_that_registers_each_command():
    """`main` imports only COMMANDS[argv[0]]: the table must match what each module registers."""
    import argparse
    import importlib

    from sigv4proxy.tools.cli import COMMAND_MODULES, COMMANDS

    registered = {}
    for module in COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers(dest="command")
        importlib.import_module(module).register(subparsers)
        registered.update(dict.fromkeys(subparsers.choices, module))
    assert registered == COMMANDS


def test_serve_imports_no_other_command():
    code = ("import sys; from sigv4proxy.tools.cli import build_parser; build_parser('serve'); "
            "print(sorted(m for m in sys.modules if m.startswith(('sigv4proxy.sim', 'sigv4proxy.tools.call', "
            "'sigv4proxy.tools.demo', 'sigv4proxy.tools.iptables'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
