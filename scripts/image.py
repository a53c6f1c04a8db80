"""`make image`: build the container image with a real engine, tag it, report its size and start.

Owns: a BuildKit-capable client, an engine to build with (the running one, or `dockerd` started
here as root and stopped by its PID), the choice of base (PYTHON_IMAGE given; else the official
image when it can be pulled; else the Debian-made one of scripts/make-base.sh) and the build.
Must never: change the host's networking (a daemon started here has no bridge, writes no iptables
rules and leaves IP forwarding alone; every container uses the host's network), leave a daemon it
started running, or let the host's CA bundle reach the image (it is a build secret of the builder
stage only). tests/test_image.py builds through `build()` too.

    python scripts/image.py [--base auto|official|local|IMAGE] [--no-report]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = "sigv4proxy"
LOCAL_BASE = "sigv4proxy-base:bookworm"
DAEMON_FLAGS = ("--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
                "--ip-masq=false")
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


class ImageError(RuntimeError):
    """The image cannot be built; the message says why."""


class EngineUnavailable(ImageError):
    """No engine, client or base-making tool here (the image tests skip with this reason)."""


def official_base() -> str:
    """The Dockerfile's default PYTHON_IMAGE."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            return line.partition("=")[2].strip()
    raise ImageError("the Dockerfile has no ARG PYTHON_IMAGE default")


def _version(client: str) -> tuple[int, ...]:
    out = subprocess.run([client, "version", "--format", "{{.Client.Version}}"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return tuple(int(p) for p in out.split("+")[0].split("-")[0].split(".")[:2] if p.isdigit())


def find_client() -> tuple[str, dict[str, str]]:
    """(docker client, extra env) able to build with BuildKit (the Dockerfile mounts a secret and
    a cache): one with the buildx plugin, or a client before 23 (Debian's docker.io) with
    DOCKER_BUILDKIT=1, which drives the engine's own BuildKit."""
    candidates = dict.fromkeys(c for c in (os.environ.get("DOCKER"), shutil.which("docker"),
                                           "/usr/bin/docker") if c and Path(c).exists())
    for client in candidates:
        if subprocess.run([client, "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
            return client, {}
    for client in candidates:
        if (0,) < _version(client) < (23,):
            return client, {"DOCKER_BUILDKIT": "1"}
    raise EngineUnavailable("no docker client that builds with BuildKit (install docker.io, or buildx)")


@dataclass
class Engine:
    """A reachable engine: the one running, or a `dockerd` started by `running_engine()`."""

    client: str
    env: dict[str, str]
    started_pid: int | None = None
    log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def docker(self, *args: str, timeout: float = 120, check: bool = True,
               **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run([self.client, *args], capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, **self.env}, **kwargs)
        if check and result.returncode != 0:
            raise ImageError(f"docker {args[0]} failed: {result.stderr.strip()[-600:]}")
        return result

    def reachable(self) -> bool:
        return self.docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30).returncode == 0


@contextlib.contextmanager
def running_engine(start_timeout: float = 60.0) -> Iterator[Engine]:
    """The running engine, or one started here (root, `dockerd` installed) and stopped on exit by
    its PID; ImageError says why there is none."""
    if not (shutil.which("docker") or Path("/usr/bin/docker").exists()):
        raise EngineUnavailable("no docker client (apt-get install docker.io)")
    client, env = find_client()
    engine = Engine(client, env)
    if engine.reachable():
        yield engine
        return
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if os.geteuid() != 0 or not Path(dockerd).exists():
        raise EngineUnavailable("no engine running, and none can be started here (needs root and dockerd)")
    workdir = Path(tempfile.mkdtemp(prefix="sigv4proxy-dockerd-"))
    engine.log = workdir / "dockerd.log"
    with open(engine.log, "wb") as log:
        proc = subprocess.Popen([dockerd, *DAEMON_FLAGS], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    engine.started_pid = proc.pid
    try:
        deadline = time.monotonic() + start_timeout
        while not engine.reachable():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = engine.log.read_text(errors="replace")[-800:]
                raise EngineUnavailable(f"dockerd did not start here: {tail}")
            time.sleep(0.2)
        yield engine
    finally:
        proc.send_signal(signal.SIGTERM)  # stops its containers and its own containerd
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def ca_bundle() -> str | None:
    """The host's CA bundle, for the builder's pip behind a TLS-inspecting proxy (trust only what
    the host already trusts)."""
    for candidate in (os.environ.get("PIP_CERT"), *CA_BUNDLES):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def choose_base(engine: Engine, requested: str = "auto") -> str:
    """`official`: the Dockerfile's default, pulled; `local`: scripts/make-base.sh's; `auto`:
    official when present or pullable, else local; anything else: that image as it is."""
    official = official_base()
    if requested in ("official", "auto"):
        if engine.docker("image", "inspect", official, check=False).returncode == 0:
            return official
        pulled = engine.docker("pull", official, check=False, timeout=600)
        if pulled.returncode == 0:
            return official
        if requested == "official":
            raise ImageError(f"cannot pull {official}: {pulled.stderr.strip()[-300:]}")
        engine.notes.append(f"{official} cannot be pulled here; base made from Debian packages")
    elif requested != "local":
        return requested
    if not shutil.which("mmdebstrap") and engine.docker("image", "inspect", LOCAL_BASE,
                                                         check=False).returncode != 0:
        raise EngineUnavailable(f"{official} cannot be pulled and mmdebstrap is missing to make a base")
    made = subprocess.run(["sh", str(ROOT / "scripts" / "make-base.sh"), LOCAL_BASE],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, **engine.env, "DOCKER": engine.client})
    if made.returncode != 0:
        raise ImageError(f"make-base.sh failed: {(made.stdout + made.stderr).strip()[-800:]}")
    return LOCAL_BASE


def build(engine: Engine, base: str, tags: tuple[str, ...] = (f"{IMAGE}:latest", f"{IMAGE}:{VERSION}"),
          timeout: float = 1200) -> str:
    """Builds the repository's Dockerfile on `base`; returns the image id. Host networking for the
    build's RUN steps: an engine without a bridge has no other network for them."""
    argv = ["build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}"]
    bundle = ca_bundle()
    if bundle:
        argv += ["--secret", f"id=pip_cert,src={bundle}"]
    for tag in tags:
        argv += ["--tag", tag]
    result = engine.docker(*argv, str(ROOT), timeout=timeout, check=False)
    if result.returncode != 0:
        raise ImageError(f"docker build failed:\n{(result.stdout + result.stderr)[-2000:]}")
    return engine.docker("image", "inspect", "--format", "{{.Id}}", tags[0]).stdout.strip()


def image_size(engine: Engine, image: str) -> int:
    return int(engine.docker("image", "inspect", "--format", "{{.Size}}", image).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=os.environ.get("PYTHON_IMAGE") or "auto",
                        help="auto (default), official, local, or an image to build on")
    parser.add_argument("--no-report", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--runs", type=int, default=5, help="start-up runs per case")
    args = parser.parse_args(argv)
    try:
        with running_engine() as engine:
            base = choose_base(engine, args.base)
            began = time.monotonic()
            build(engine, base)
            took = time.monotonic() - began
            tags = f"{IMAGE}:latest, {IMAGE}:{VERSION}"
            size, base_size = image_size(engine, f"{IMAGE}:latest"), image_size(engine, base)
            for note in engine.notes:
                print(f"image: {note}")
            print(f"image: built {tags} on {base} in {took:.0f} s: {size / 1e6:.0f} MB "
                  f"({(size - base_size) / 1e6:.0f} MB over the base's {base_size / 1e6:.0f} MB)")
            if args.no_report:
                return 0
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import bench_start

            return bench_start.main(["--image", f"{IMAGE}:latest", "--docker", engine.client,
                                     "--runs", str(args.runs)])
    except ImageError as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
