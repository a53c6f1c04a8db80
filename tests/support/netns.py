"""Throwaway Linux network namespaces for tests that need iptables or non-loopback addresses.

Owns: creating a uniquely named namespace (loopback up, IPv6 on unless asked otherwise), running
commands inside it, and always deleting it again, including any process still running in it. Must never touch the host's own
network namespace: every `ip`/`iptables` call made here is scoped to a namespace it created.

    ok, reason = have_netns_support()
    if not ok: pytest.skip(reason)
    with netns("orig") as ns:
        run_in_netns(ns, ["iptables", "-t", "nat", "-S"])
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
from typing import Iterator, Sequence

# Root's tools live in sbin, which a non-login PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
COMMAND_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """A namespace could not be created or set up."""


def tool(name: str) -> str | None:
    """Absolute path of a system tool, looking in sbin too."""
    return shutil.which(name, path=_SEARCH_PATH)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = tool("ip")
    if ip is None:
        raise NetnsError("`ip` (iproute2) is not installed")
    result = subprocess.run([ip, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()[:300]}")
    return result


def _exec_prefix(name: str) -> list[str]:
    ip = tool("ip")
    if ip is None:
        raise NetnsError("`ip` (iproute2) is not installed")
    return [ip, "netns", "exec", name]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": _SEARCH_PATH}


def run_in_netns(name: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S,
                 **kwargs) -> subprocess.CompletedProcess[str]:
    """Run argv inside the namespace; captures text output; never hangs past `timeout`."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("env", _env())
    return subprocess.run([*_exec_prefix(name), *argv], timeout=timeout, **kwargs)


def popen_in_netns(name: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start a long-running process inside the namespace (the caller stops it; `netns` also will)."""
    kwargs.setdefault("env", _env())
    return subprocess.Popen([*_exec_prefix(name), *argv], **kwargs)


def _kill_members(name: str) -> None:
    """Kill processes still inside the namespace: they were all started by the test that owns it."""
    result = _ip("netns", "pids", name, check=False)
    for token in result.stdout.split():
        if token.isdigit() and int(token) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(token), signal.SIGKILL)


def _set_ipv6(name: str, enabled: bool) -> None:
    """IPv6 on or off for every interface of the namespace, present and future (off: lo loses ::1
    and /proc/net/if_inet6 is empty, as in a pod with IPv6 disabled). A namespace may inherit
    either from the host, so it is always set; written to /proc, which needs no sysctl binary."""
    value = "0" if enabled else "1"
    script = " && ".join(f"echo {value} > /proc/sys/net/ipv6/conf/{which}/disable_ipv6"
                         for which in ("default", "all"))
    result = run_in_netns(name, ["sh", "-c", script])
    if result.returncode != 0:
        raise NetnsError(f"cannot turn IPv6 {'on' if enabled else 'off'} in a namespace: "
                         f"{result.stderr.strip()[:300]}")


@contextlib.contextmanager
def netns(name_prefix: str = "sigv4t", *, ipv6: bool = True) -> Iterator[str]:
    """Create a fresh namespace with `lo` up and IPv6 on (or off), yield its name, and always
    delete it. Give IPv6 addresses `nodad`, so they are usable at once."""
    name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        _set_ipv6(name, ipv6)
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _kill_members(name)
        _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def netns_etc_file(name: str, filename: str, text: str) -> Iterator[pathlib.Path]:
    """/etc/netns/<name>/<filename>: `ip netns exec <name>` bind-mounts it over /etc/<filename>
    for what runs there (e.g. resolv.conf naming a resolver the test controls); always removed."""
    directory = pathlib.Path("/etc/netns") / name
    made_root = not directory.parent.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        (directory / filename).write_text(text)
        yield directory / filename
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):
                directory.parent.rmdir()


@functools.lru_cache(maxsize=1)
def have_netns_support() -> tuple[bool, str]:
    """(True, "") if this process can create a namespace with IPv6 and use the iptables and
    ip6tables nat tables in it."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "needs root to create network namespaces (ip netns add)"
    for name, package in (("ip", "iproute2"), ("iptables", "iptables"), ("ip6tables", "iptables")):
        if tool(name) is None:
            return False, f"`{name}` not installed (Debian package {package}; scripts/ci-deps.sh)"
    try:
        with netns("sigv4probe") as name:
            for command in ("iptables", "ip6tables"):
                result = run_in_netns(name, [command, "-t", "nat", "-S"])
                if result.returncode != 0:
                    return False, f"{command} nat table unusable in a namespace: {result.stderr.strip()[:200]}"
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot create a network namespace here: {exc}"
    return True, ""
