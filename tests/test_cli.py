import subprocess
import sys

from sigv4proxy.cli import build_parser


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sigv4proxy", "--help"], capture_output=True, text=True, check=True)
    assert "usage: sigv4proxy" in out.stdout


def test_every_registered_command_has_a_func():
    parser = build_parser()
    sub = [a for a in parser._actions if a.dest == "command"]
    for name, subparser in (sub[0].choices.items() if sub and sub[0].choices else []):
        assert subparser.get_default("func") is not None, name
