"""The Go aws-sigv4-proxy as `make bench` runs it: as shipped, with its idle pool raised, and
that pooled build over TLS.

Owns: finding the two builds in a directory (under the names docs/performance.md's build gives
them), telling whether a build has the upstream flag for the idle pool, and their command lines
and environment. It must never build or download anything, and never point a peer anywhere but
the local upstream.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_BINARY = "aws-sigv4-proxy-bin"  # upstream source as it is
POOLED_BINARY = "aws-sigv4-proxy-tuned-bin"  # the same with MaxIdleConnsPerHost raised in main()
POOL_FLAG = "--transport.max-idle-conns-per-host"  # upstream's flag, in builds that have it
POOL_SIZE = 1024
TLS_PEER = "peer:go-pooled-tls"
NOT_BUILT = "not built: {} missing (docs/performance.md says how to build it)"


@dataclass(frozen=True)
class GoPeer:
    name: str  # the target's name, e.g. "peer:go-pooled"
    argv: list[str]  # with the harness's {port} {upstream_host} {upstream_port} placeholders
    skip_reason: str = ""
    env: dict[str, str] = field(default_factory=dict)  # on top of the harness's credentials


def common_args(binary: Path, host: str = "{upstream_host}:{upstream_port}", scheme: str = "http") -> list[str]:
    """To the local upstream (by default over HTTP/1.1: Go has no cleartext HTTP/2 client),
    signing for Lattice without payload hashing, as our proxy does."""
    return [
        str(binary),
        "--port",
        "127.0.0.1:{port}",
        "--host",
        host,
        "--upstream-url-scheme",
        scheme,
        "--name",
        "vpc-lattice-svcs",
        "--region",
        "us-west-2",
        "--unsigned-payload",
    ]


def has_pool_flag(binary: Path) -> bool:
    """True when the build's --help lists the idle-pool flag (kingpin prints help on stderr)."""
    try:
        probe = subprocess.run([str(binary), "--help"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return POOL_FLAG.encode() in probe.stdout + probe.stderr


def pooled_build(directory: Path) -> tuple[Path, list[str]]:
    """The pooled sidecar: the shipped build with the flag when it has it, else the build with
    the pool raised in main(); (binary, extra flags)."""
    shipped = directory / SHIPPED_BINARY
    if shipped.exists() and has_pool_flag(shipped):
        return shipped, [f"{POOL_FLAG}={POOL_SIZE}"]
    return directory / POOLED_BINARY, []


def go_peers(directory: Path) -> list[GoPeer]:
    """peer:go (as shipped: Go's idle pool of 2 connections per host) and peer:go-pooled (1024),
    each flagged when its build is missing."""
    shipped = directory / SHIPPED_BINARY
    pooled, flags = pooled_build(directory)
    return [
        GoPeer("peer:go", common_args(shipped), "" if shipped.exists() else NOT_BUILT.format(shipped)),
        GoPeer("peer:go-pooled", common_args(pooled) + flags, "" if pooled.exists() else NOT_BUILT.format(pooled)),
    ]


def go_tls_peer(directory: Path, ca_file: str) -> GoPeer:
    """peer:go-pooled-tls: the pooled build to the upstream's TLS port (`ca_file`: the CA that
    signed its certificate for 127.0.0.1; "" when the upstream has no TLS port), trusting that
    CA through SSL_CERT_FILE (Go on Linux reads it for its roots). Go's default transport offers
    h2 by ALPN, and nginx takes it: its access log showed HTTP/2.0 (docs/performance.md)."""
    pooled, flags = pooled_build(directory)
    skip = ""
    if not pooled.exists():
        skip = NOT_BUILT.format(pooled)
    elif not ca_file:
        skip = "no TLS upstream (needs nginx and trustme)"
    return GoPeer(
        TLS_PEER,
        common_args(pooled, "127.0.0.1:{upstream_h2tls_port}", "https") + flags,
        skip,
        {"SSL_CERT_FILE": ca_file} if ca_file else {},
    )
