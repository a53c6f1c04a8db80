"""The compat layer's version ranges: the installed releases accepted, one outside its range
refused by every command before it runs (exit 2, naming the library, its version and the range),
the same ranges in pyproject.toml and the lowest constraints, and private API nowhere else."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from sigv4proxy.compat import versions

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sigv4proxy"
LIBRARIES = ("aiohttp", "botocore", "h2", "hpack", "hyperframe", "prometheus_client", "uvloop", "awscrt")


def requirement(line: str) -> tuple[str, str]:
    name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", line.split(";")[0].strip()).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.strip()


def runtime_dependencies() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(requirement(line) for line in project["dependencies"])


def test_the_installed_releases_are_accepted_and_read_as_importlib_reads_them():
    versions.check_all()
    for supported in versions.ALL:
        assert versions.installed_version(supported.distribution, supported.module) == \
            importlib.metadata.version(supported.distribution)


def fake_release(root: pathlib.Path, module: str, distribution: str, version: str) -> None:
    """An importable `module` claiming to be `distribution` `version`, as pip would lay it out."""
    (root / module).mkdir()
    (root / module / "__init__.py").write_text("raise ImportError('the fake release was imported')\n")
    info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")


def run_with(fakes: pathlib.Path, *argv: str) -> subprocess.CompletedProcess:
    """`python *argv` with the fake releases in `fakes` found before the installed ones."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(fakes), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("argv", [
    ["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
    ["sim", "--listen", "127.0.0.1:0"],
    ["call", "http://127.0.0.1:9/"],
    ["demo", "--listen", "127.0.0.1:0"],
    ["--port", "0", "--name", "vpc-lattice-svcs"],  # the Go proxy's flags: serve
])
def test_a_library_outside_its_range_stops_every_command_before_it_runs(tmp_path, argv):
    fake_release(tmp_path, "aiohttp", "aiohttp", "3.13.5")  # the release whose splice upload broke
    out = run_with(tmp_path, "-m", "sigv4proxy", *argv)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == ("sigv4proxy: aiohttp 3.13.5 is installed; this sigv4proxy was tested with "
                          "aiohttp>=3.14.4,<3.15 only (it uses aiohttp's internals): install a release in "
                          "that range\n")
    assert out.stdout == ""


def test_a_release_past_the_ceiling_is_refused_too(tmp_path):
    fake_release(tmp_path, "prometheus_client", "prometheus-client", versions.PROMETHEUS_CLIENT.ceiling + ".0")
    out = run_with(tmp_path, "-m", "sigv4proxy", "serve", "--listen", "127.0.0.1:0")
    assert out.returncode == 2
    assert f"prometheus-client {versions.PROMETHEUS_CLIENT.ceiling}.0 is installed" in out.stderr
    assert str(versions.PROMETHEUS_CLIENT) in out.stderr


def test_a_compat_module_refuses_to_load_before_its_library_does(tmp_path):
    """Whoever imports it: the old h2 is refused, never imported (the fake raises if it is)."""
    fake_release(tmp_path, "h2", "h2", "4.1.0")
    out = run_with(tmp_path, "-c", "import sigv4proxy.compat.h2")
    assert out.returncode == 1
    assert "UnsupportedVersion: h2 4.1.0 is installed" in out.stderr
    assert "the fake release was imported" not in out.stderr


def test_pyproject_states_the_ranges_the_compat_modules_were_tested_with():
    dependencies = runtime_dependencies()
    for supported in versions.ALL:
        name = supported.distribution.lower()
        assert dependencies.get(name) == f">={supported.floor},<{supported.ceiling}", name


def release(version: str) -> tuple[int, ...]:
    """3.14.0 and 3.14 alike: (3, 14)."""
    parts = [int(part) for part in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_every_runtime_dependency_is_bounded_and_the_lowest_constraints_pin_its_floor():
    lines = (ROOT / "constraints" / "lowest.txt").read_text().splitlines()
    pins = {requirement(line)[0]: line.split("==")[1].strip() for line in lines if line and not line.startswith("#")}
    dependencies = runtime_dependencies()
    assert set(pins) == set(dependencies)
    for name, spec in dependencies.items():
        floor, ceiling = re.fullmatch(r">=([\d.]+),<([\d.]+)", spec).groups()
        assert release(pins[name]) == release(floor), name
        assert release(floor) < release(ceiling), name


def library_names(tree: ast.AST) -> set[str]:
    """Names a module binds to a library's modules (`import h2.connection` binds `h2`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def private_uses(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in LIBRARIES and any(part.startswith("_") for part in module.split(".")):
                    found.append(f"{path.name}:{node.lineno} imports {module}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                found += [f"{path.name}:{node.lineno} imports {alias.name}" for alias in node.names
                          if alias.name.startswith("_")]
    bound = library_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{path.name}:{node.lineno} reads {node.attr} of {root.id}")
    return found


def test_no_module_outside_compat_reaches_into_a_library():
    modules = [p for p in PACKAGE.rglob("*.py") if "compat" not in p.relative_to(PACKAGE).parts]
    assert len(modules) > 50
    assert [use for path in modules for use in private_uses(path)] == []


def test_the_checker_finds_what_the_compat_modules_do():
    """The check above is not blind: it sees the compat modules' own private uses."""
    assert private_uses(PACKAGE / "compat" / "h2.py")  # H2ConnectionStateMachine._transitions
    assert private_uses(PACKAGE / "compat" / "hyperframe.py")  # hyperframe.frame._raw_data_repr


def test_compat_imports_nothing_of_ours_outside_compat():
    for path in (PACKAGE / "compat").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sigv4proxy"):
                assert node.module.startswith("sigv4proxy.compat"), (path.name, node.module)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("sigv4proxy") or \
                        alias.name.startswith("sigv4proxy.compat"), (path.name, alias.name)
