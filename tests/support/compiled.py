"""The modules setup.py's compiled build compiles (its COMPILED list, read without running it)."""

from __future__ import annotations

import ast
import importlib.machinery
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def compiled_paths() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["COMPILED"]:
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no COMPILED list")


def compiled_modules() -> list[str]:
    """Dotted names: sigv4proxy/aws/signing.py -> sigv4proxy.aws.signing."""
    return [path.removesuffix(".py").replace("/", ".") for path in compiled_paths()]


def is_extension(filename: str | None) -> bool:
    return bool(filename) and filename.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
