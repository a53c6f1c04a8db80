"""Which build a pass of the suite runs: `make test` runs its first pass on the compiled build
(setup.py, SIGV4PROXY_EXPECT_COMPILED=1) and its second on pure Python, so each sees every test. A
pass that runs the other build than it says fails here rather than passing for the wrong one (a
compile that built nothing; a compiled build left in the tree shadowing edited sources)."""

from __future__ import annotations

import importlib
import os

from support.compiled import ROOT, compiled_modules, compiled_paths, is_extension

EXPECT_COMPILED = os.environ.get("SIGV4PROXY_EXPECT_COMPILED") == "1"


def test_the_compiled_list_names_existing_modules_once():
    paths = compiled_paths()
    assert paths and len(paths) == len(set(paths))
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"setup.py's COMPILED names modules that do not exist: {missing}"


def test_this_pass_runs_the_build_it_says():
    loaded = {name: importlib.import_module(name).__file__ for name in compiled_modules()}
    wrong = sorted(name for name, where in loaded.items() if is_extension(where) != EXPECT_COMPILED)
    if EXPECT_COMPILED:
        assert not wrong, f"expected the compiled build (make compile), but pure Python ran: {wrong}"
    else:
        assert not wrong, f"compiled modules are in the tree (make uncompile): {wrong}"

