"""The documents against the code: every flag, metric and error kind the README and docs/ name
exists; every relative link and #anchor between them resolves; and docs/architecture.md's layer
tables say what pyproject.toml's import contracts enforce.

The oracles are the code's own: the argparse parsers of `sigv4proxy` (every subcommand), of the Go
sidecar's drop-in flags, of `benchmarks/bench.py` and `benchmarks/soak.py`; a fresh `Metrics()`
registry; the `ProxyError` classes; `[tool.importlinter]`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sigv4proxy.errors import ProxyError
from sigv4proxy.observe.metrics import Metrics
from sigv4proxy.tools.cli import build_parser
from sigv4proxy.tools.go_flags import go_parser

ROOT = Path(__file__).resolve().parent.parent
ALL_DOCS = ["README.md", "docs/guide.md", "docs/failure-behaviour.md", "docs/architecture.md", "docs/performance.md"]

# Flags of other programs the docs show on their command lines (curl, docker, wrk, h2load, git,
# py-spy), and two of the Go sidecar that its shipped build lacks (performance.md says so).
OTHER_TOOLS = {"--http2", "--http2-prior-knowledge", "--secret", "--latency", "--h1", "--rps", "--git-dir",
               "--native", "--rate-limit", "--transport.max-idle-conns-per-host"}
FLAG = re.compile(r"(?<![\w/#-])--[a-z0-9][a-z0-9.-]*[a-z0-9]")
LINK = re.compile(r"\]\(([^)\s]+)\)")
METRIC = re.compile(r"sigv4proxy_[a-z_]+[a-z]")


def text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def without_link_targets(markdown: str) -> str:
    return LINK.sub("]()", markdown)


def parser_flags(parser: argparse.ArgumentParser, found: set[str]) -> set[str]:
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                parser_flags(sub, found)
    return found


def script_flags(script: str) -> set[str]:
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(re.findall(r"--[a-z0-9][a-z0-9.-]*", out))


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    return (parser_flags(build_parser(), set()) | parser_flags(go_parser(), set())
            | script_flags("benchmarks/bench.py") | script_flags("benchmarks/soak.py") | OTHER_TOOLS)


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_every_flag_the_docs_name_exists(doc, known_flags):
    named = set(FLAG.findall(without_link_targets(text(doc))))
    assert named, f"{doc} names no flag: the pattern is broken"
    assert sorted(named - known_flags) == []


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_every_metric_the_docs_name_exists(doc):
    exposed = set()
    for family in Metrics().registry.collect():
        exposed.add(family.name + ("_total" if family.type == "counter" else ""))
    named = set(METRIC.findall(text(doc)))
    assert sorted(named - exposed) == []


def test_the_readme_lists_every_metric():
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()}
    assert sorted(exposed - set(METRIC.findall(text("README.md")))) == []


def error_kinds() -> set[str]:
    kinds, todo = set(), [ProxyError]
    while todo:
        cls = todo.pop()
        kinds.add(cls.kind)
        todo.extend(cls.__subclasses__())
    return kinds | {"client_disconnect"}  # counted by the exchange when a client goes away mid-answer


@pytest.mark.parametrize("doc", ["README.md", "docs/failure-behaviour.md"])
def test_every_error_kind_in_a_failure_table_exists(doc):
    kinds = error_kinds()
    named = set()
    for line in text(doc).splitlines():
        if line.startswith("| ") and line.count("|") >= 4:
            named.update(re.findall(r"`([a-z]+(?:_[a-z]+)+)`", line.rsplit("|", 2)[1]))
    named = {n for n in named if not n.startswith("sigv4proxy_")}
    assert named, f"{doc}: no error kind found in a table"
    assert sorted(named - kinds) == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    found: dict[str, int] = {}
    out = set()
    in_code = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = found.get(base, 0)
        found[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_every_relative_link_and_anchor_resolves(doc):
    source = ROOT / doc
    broken = []
    for target in LINK.findall(text(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve() if path else source
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


def cell_packages(cell: str) -> set[str]:
    names = set(re.findall(r"`([a-z]+)`", cell))
    if "the leaves" in cell:
        names |= {"errors", "fields", "limits", "model"}
    return names


def table_rows(markdown: str, header: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def contracts() -> list[dict]:
    return tomllib.loads(text("pyproject.toml"))["tool"]["importlinter"]["contracts"]


def test_the_architecture_layers_are_the_import_contracts_layers():
    layers = next(c for c in contracts() if c["type"] == "layers")["layers"]
    enforced = [{name.strip().removeprefix("sigv4proxy.") for name in layer.split("|")} for layer in layers]
    rows = table_rows(text("docs/architecture.md").replace("\\|", "/"), "| layer (top to bottom)")
    documented = [cell_packages(row[1]) for row in rows]
    assert documented == enforced


def test_the_architecture_forbidden_imports_are_the_forbidden_contracts():
    forbidden = [c for c in contracts() if c["type"] == "forbidden"]
    layers = next(c for c in contracts() if c["type"] == "layers")["layers"]
    every = {n.strip().removeprefix("sigv4proxy.") for layer in layers for n in layer.split("|")} | {"sim"}
    enforced = {(frozenset(m.removeprefix("sigv4proxy.") for m in c["source_modules"]),
                 frozenset(m.removeprefix("sigv4proxy.") for m in c["forbidden_modules"])) for c in forbidden}
    documented = set()
    for source_cell, forbidden_cell, _why in table_rows(text("docs/architecture.md"), "| package | must not import"):
        sources = cell_packages(source_cell)
        names = every - sources if forbidden_cell.startswith("anything") else cell_packages(forbidden_cell)
        documented.add((frozenset(sources), frozenset(names)))
    assert documented == enforced
