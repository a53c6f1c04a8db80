"""The Go aws-sigv4-proxy as `make bench` runs it: as shipped and with its idle pool raised.

Owns: finding the two builds in a directory (under the names docs/performance.md's build gives
them), telling whether a build has the upstream flag for the idle pool, and their command lines. It must never build or download anything, and never
point a peer anywhere but the local upstream.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SHIPPED_BINARY = "aws-sigv4-proxy-bin"  # upstream source as it is
POOLED_BINARY = "aws-sigv4-proxy-tuned-bin"  # the same with MaxIdleConnsPerHost raised in main()
POOL_FLAG = "--transport.max-idle-conns-per-host"  # upstream's flag, in builds that have it
POOL_SIZE = 1024


@dataclass(frozen=True)
class GoPeer:
    name: str  # the target's name, e.g. "peer:go-pooled"
    argv: list[str]  # with the harness's {port} {upstream_host} {upstream_port} placeholders
    skip_reason: str = ""


def common_args(binary: Path) -> list[str]:
    """Over HTTP/1.1 to the local upstream (Go has no cleartext HTTP/2 client), signing for
    Lattice without payload hashing, as our proxy does."""
    return [str(binary), "--port", "127.0.0.1:{port}", "--host", "{upstream_host}:{upstream_port}",
            "--upstream-url-scheme", "http", "--name", "vpc-lattice-svcs", "--region",
            "us-west-2", "--unsigned-payload"]


def has_pool_flag(binary: Path) -> bool:
    """True when the build's --help lists the idle-pool flag (kingpin prints help on stderr)."""
    try:
        probe = subprocess.run([str(binary), "--help"], capture_output=True, timeout=30,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return POOL_FLAG.encode() in probe.stdout + probe.stderr


def go_peers(directory: Path) -> list[GoPeer]:
    """peer:go (as shipped: Go's idle pool of 2 connections per host) and peer:go-pooled (1024),
    each flagged when its build is missing. The pooled one is the shipped build with the flag
    when that build has it, else the build with the pool raised in main()."""
    shipped, pooled = directory / SHIPPED_BINARY, directory / POOLED_BINARY
    missing = "not built: {} missing (docs/performance.md says how to build it)"
    peers = [GoPeer("peer:go", common_args(shipped),
                    "" if shipped.exists() else missing.format(shipped))]
    if shipped.exists() and has_pool_flag(shipped):
        peers.append(GoPeer("peer:go-pooled", common_args(shipped) + [f"{POOL_FLAG}={POOL_SIZE}"]))
    else:
        peers.append(GoPeer("peer:go-pooled", common_args(pooled),
                            "" if pooled.exists() else missing.format(pooled)))
    return peers
