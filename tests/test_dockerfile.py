"""The Dockerfile as text, for machines without a container engine (tests/test_image.py builds
and runs it where one exists): multi-stage on one pinned slim Python by default, no build tools
in the final stage, uid 101, ports 8080/9901, a build context trimmed by .dockerignore; its
HEALTHCHECK one-liner is run for real against a loopback HTTP server, and its builder stage's
wheel is built (offline) and run."""

from __future__ import annotations

import fnmatch
import http.server
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile

import pytest

from support.deploy_files import (
    ADMIN_PORT,
    PROXY_PORT,
    PROXY_UID,
    ROOT,
    base_images,
    dockerfile,
    exec_form,
    final,
    healthcheck_argv,
    stages,
)


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python():
    images = base_images()
    assert len(images) >= 2
    for image in images:
        assert re.fullmatch(r"python:3\.1[12]\.\d+-slim(-\w+)?", image), f"unpinned or non-slim base {image}"
    assert len(set(images)) == 1, "builder and runtime must share the interpreter"


def test_final_stage_has_no_build_tools():
    builder, runtime = stages()[0], stages()[-1]
    final_text = " ".join(i.args for i in runtime).lower()
    for tool in ("build-essential", "gcc", "g++", "clang", "python3-dev", "libffi-dev", "binutils"):
        assert not re.search(rf"(^|[\s/]){re.escape(tool)}(\s|$)", final_text), f"{tool} in final stage"
    assert "binutils" in " ".join(i.args for i in builder)  # strip, in the builder only
    # The final stage gets the builder's virtualenv, nothing else of it.
    assert [i.args for i in runtime if i.keyword == "COPY"] == ["--from=builder /opt/sigv4proxy /opt/sigv4proxy"]
    # The init container runs `sigv4proxy iptables --apply` from this image.
    assert any("iptables" in i.args for i in runtime if i.keyword == "RUN")


def test_runs_as_uid_101_with_unbuffered_python():
    (user,) = final("USER")
    assert user.args.split(":")[0] == str(PROXY_UID)
    assert re.search(r"useradd\b.*--uid 101\b", " ".join(i.args for i in final("RUN")))
    env = " ".join(i.args for i in final("ENV"))
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def test_ports_entrypoint_and_cmd():
    exposed = {int(p.split("/")[0]) for i in final("EXPOSE") for p in i.args.split()}
    assert exposed == {PROXY_PORT, ADMIN_PORT}
    (entrypoint,) = final("ENTRYPOINT")
    assert exec_form(entrypoint.args) == ["sigv4proxy"]
    (cmd,) = final("CMD")
    assert exec_form(cmd.args) == ["serve", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901"]


def test_dockerignore_keeps_the_build_context_to_what_is_copied():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                verdict = not negate
        return verdict

    for inst in dockerfile():
        if inst.keyword == "COPY" and "--from" not in inst.args:
            for source in inst.args.split()[:-1]:
                assert not ignored(source.rstrip("/")), f"COPY {source} is excluded by .dockerignore"
    for path in (".venv", ".git", "tests", "benchmarks", ".pytest_cache"):
        assert ignored(path), f"{path} would be sent to the builder"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_one_liner_really_checks_healthz(status, healthy):
    argv = healthcheck_argv()
    assert argv[0] == "python" and argv[1] == "-c"
    assert "http://127.0.0.1:9901/healthz" in argv[2]
    handler = type("Health", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = argv[2].replace("127.0.0.1:9901", f"127.0.0.1:{server.server_address[1]}")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert (result.returncode == 0) is healthy


def test_healthcheck_fails_when_nothing_listens():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = healthcheck_argv()[2].replace("127.0.0.1:9901", f"127.0.0.1:{port}")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode != 0


def _copy_builder_sources(into: pathlib.Path) -> None:
    """What the builder stage COPYs from the build context, laid out as COPY lays it out: a
    directory's contents go into the destination; a file goes into it when it ends in '/'."""
    for inst in stages()[0]:
        if inst.keyword != "COPY" or "--from" in inst.args:
            continue
        *sources, dest = inst.args.split()
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, into / dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target = into / dest / origin.name if dest.endswith("/") else into / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, target)


def test_builder_stage_builds_a_wheel_that_runs(tmp_path):
    """The builder's `pip wheel .` on exactly what it copies, offline with our setuptools: every
    package file (the demo's JSON included) must reach the wheel, and the installed wheel, on its
    own path, must run `sigv4proxy demo`'s data loading and the CLI."""
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    _copy_builder_sources(src)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("sigv4proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    # the sources (a compiled build in the tree, `make compile`, is not part of them)
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "sigv4proxy").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"]
    assert "sigv4proxy/demo/identities.json" in package
    assert sorted(set(package) - names) == []
    assert re.search(r"^sigv4proxy = sigv4proxy\.tools\.cli:main$", entry_points, re.M)

    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = ("import json, sigv4proxy, sigv4proxy.tools.demo as d; print(sigv4proxy.__file__); "
             "print(len(json.load(open(d.demo_file('identities.json')))))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         timeout=60, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    where, identities = ran.stdout.split()
    assert pathlib.Path(where).is_relative_to(site), f"imported {where}, not the built wheel"
    assert int(identities) > 0
    cli = subprocess.run([sys.executable, "-m", "sigv4proxy", "serve", "--help"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=tmp_path)
    assert cli.returncode == 0 and "--upstream" in cli.stdout, cli.stderr
