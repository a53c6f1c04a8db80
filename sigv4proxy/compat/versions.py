"""The releases of each library whose private API the proxy uses that its compat module was written
and tested against, and the check that refuses any other at start.

Owns: one `Supported` range per compat module (floor included, ceiling excluded; `make test` runs
the suite at both ends: constraints/lowest.txt and the newest releases in range), reading the
installed version without importing the library, and `check_all`, which the command line calls
before any command runs. Must never: import a library it checks (the `--workers` supervisor and
commands that do not serve stay without them; a release outside the range must be refused before
its import can fail in some other way), or import anything of ours outside `compat`.

pyproject.toml states the same ranges (tests/test_compat_versions.py holds the two together).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from functools import cache

_RELEASE = re.compile(r"\d+(?:\.\d+)*")


class UnsupportedVersion(Exception):
    """An installed library outside the range its compat module was tested against (or missing)."""


@dataclass(frozen=True)
class Supported:
    distribution: str  # the name pip installs it by
    module: str  # the name it is imported by
    floor: str  # lowest release tested (included)
    ceiling: str  # first release not tested (excluded)

    def __str__(self) -> str:
        return f"{self.distribution}>={self.floor},<{self.ceiling}"

    def check(self) -> None:
        installed = installed_version(self.distribution, self.module)
        if installed is None:
            raise UnsupportedVersion(f"{self.distribution} is not installed; this sigv4proxy needs {self}")
        if not _release(self.floor) <= _release(installed) < _release(self.ceiling):
            raise UnsupportedVersion(
                f"{self.distribution} {installed} is installed; this sigv4proxy was tested with {self} "
                f"only (it uses {self.distribution}'s internals): install a release in that range"
            )


AIOHTTP = Supported("aiohttp", "aiohttp", "3.14.4", "3.15")  # compat.aiohttp
BOTOCORE = Supported("botocore", "botocore", "1.40.2", "1.45")  # compat.botocore
H2 = Supported("h2", "h2", "4.4", "4.5")  # compat.h2
HPACK = Supported("hpack", "hpack", "4.2", "4.3")  # compat.hpack
HYPERFRAME = Supported("hyperframe", "hyperframe", "6.1", "6.2")  # compat.hyperframe
PROMETHEUS_CLIENT = Supported("prometheus-client", "prometheus_client", "0.20", "0.27")  # compat.prometheus_client
ALL = (AIOHTTP, BOTOCORE, H2, HPACK, HYPERFRAME, PROMETHEUS_CLIENT)


def check_all() -> None:
    """Raises UnsupportedVersion for the first library outside its range."""
    for supported in ALL:
        supported.check()


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string ("3.14.0rc1" -> (3, 14, 0)): a pre-release of a
    ceiling is refused with it."""
    match = _RELEASE.match(version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


@cache
def installed_version(distribution: str, module: str) -> str | None:
    """The version of the installed `distribution`, read from the `NAME-VERSION.dist-info` folder
    beside the importable `module`: importlib.metadata would add its own imports to every start
    (docs/performance.md). Other layouts (several such folders, egg-info) fall back to it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.origin and spec.submodule_search_locations is not None:  # a package in site-packages
        wanted = _normalized(distribution)
        found = [
            version
            for name, _, version in (
                entry[: -len(".dist-info")].partition("-")
                for entry in _entries(os.path.dirname(os.path.dirname(spec.origin)))
                if entry.endswith(".dist-info")
            )
            if _normalized(name) == wanted
        ]
        if len(found) == 1:
            return found[0]
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _entries(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
