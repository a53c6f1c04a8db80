"""Processes for `make bench`: start in their own process group, stop for sure, sample /proc.

Owns: every child process the harness starts (servers and load generators), loopback port
checks, readiness probes and the /proc sampler. It must never leave a process running (every
start has a stop that escalates to SIGKILL on the whole group) and never talk to anything but
127.0.0.1.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_parse import (ProcStat, cpu_seconds_between, largest_process_rss_kib, parse_proc_stat,
                         parse_proc_status_memory, peak_rss_kib, tree_members)

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """The harness cannot go on (a tool is missing, a port is taken, a server never got ready)."""


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def port_is_listening(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """A child in its own session (so Ctrl-C reaches only us, and we stop its whole group)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the group, wait, then SIGKILL the group. Safe to call twice."""
        if self.popen is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers that outlived their parent still carry its group id.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def taskset_prefix(cpus: tuple[int, ...]) -> list[str]:
    """`taskset -c LIST` to run a command on those CPUs only ([] for no limit)."""
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


def split_cpus(available: set[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(one CPU for the measured server, the rest for load generator and upstream), or None with
    fewer than two CPUs."""
    cpus = sorted(available)
    return ((cpus[-1],), tuple(cpus[:-1])) if len(cpus) >= 2 else None


class PinnedTree:
    """`with PinnedTree(root_pid, cpus):` keeps a running process tree (the upstream) on `cpus`,
    restoring each process's own CPU set afterwards (processes that left meanwhile are skipped)."""

    def __init__(self, root_pid: int, cpus: tuple[int, ...]) -> None:
        self.root_pid, self.cpus = root_pid, cpus
        self.saved: dict[int, set[int]] = {}

    def __enter__(self) -> "PinnedTree":
        if self.cpus:
            for pid in tree_members(_read_all_stats(), self.root_pid):
                try:
                    self.saved[pid] = os.sched_getaffinity(pid)
                    os.sched_setaffinity(pid, self.cpus)
                except OSError:
                    continue
        return self

    def __exit__(self, *exc_info) -> None:
        for pid, cpus in self.saved.items():
            try:
                os.sched_setaffinity(pid, cpus)
            except OSError:
                continue


def group_has_live_members(pgid: int) -> bool:
    """True while any non-zombie process is left in the process group."""
    return any(s.pgrp == pgid and s.state != "Z" for s in _read_all_stats())


def run_bounded(argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run a load generator to completion in its own group; kill the group if it overstays."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return out.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{argv[0]} ran past {timeout_s:.0f}s and was killed") from exc
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


def http_probe(port: int, path: str = "/", host: str | None = None, method: str = "GET",
               body: bytes | None = None, timeout: float = 5.0) -> int:
    """One request to 127.0.0.1:port; returns the status (raises OSError when nothing answers)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"Host": host} if host else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_until(ready, proc: ManagedProcess | None, timeout_s: float, what: str) -> None:
    """Poll `ready()` every 100 ms until true; fail early when `proc` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise HarnessError(f"{what} exited early:\n{proc.log_tail()}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise HarnessError(f"{what} not ready after {timeout_s:.0f}s")


def _read_all_stats() -> list[ProcStat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats.append(parse_proc_stat(Path(f"/proc/{entry}/stat").read_text()))
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
    return stats


def tree_rss_kib(root_pid: int) -> dict[int, int]:
    """Current RSS (KiB) of `root_pid` and every descendant, by pid."""
    stats = _read_all_stats()
    rss = {}
    for pid in tree_members(stats, root_pid):
        try:
            rss[pid] = parse_proc_status_memory(Path(f"/proc/{pid}/status").read_text())[0]
        except OSError:
            continue  # exited while we looked
    return rss


class TreeSampler:
    """Samples a process tree's CPU ticks and memory every `interval_s` in a background thread."""

    def __init__(self, root_pid: int, interval_s: float = 0.2) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.memory_samples: list[dict[int, tuple[int, int]]] = []
        self.start_ticks: dict[int, int] = {}
        self.last_ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def snapshot_ticks(self) -> dict[int, int]:
        stats = _read_all_stats()
        members = tree_members(stats, self.root_pid)
        return {s.pid: s.cpu_ticks for s in stats if s.pid in members}

    def _sample(self) -> None:
        ticks = self.snapshot_ticks()
        memory = {}
        for pid in ticks:
            try:
                memory[pid] = parse_proc_status_memory(Path(f"/proc/{pid}/status").read_text())
            except OSError:
                continue
        self.memory_samples.append(memory)
        # Keep the latest ticks of pids that may exit before the final snapshot.
        self.last_ticks.update(ticks)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def cpu_seconds(self) -> float:
        return cpu_seconds_between(self.start_ticks, self.last_ticks, CLK_TCK)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.memory_samples)

    def largest_process_rss_kib(self) -> int:
        return largest_process_rss_kib(self.memory_samples)

    def reset_peaks(self, pids) -> None:
        """Restart each process's VmHWM at its current RSS, so a case's peak is its own and not
        left over from an earlier case (best effort: needs Linux >= 4.0 and permission)."""
        for pid in pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                continue

    def __enter__(self) -> "TreeSampler":
        self.start_ticks = self.snapshot_ticks()
        self.reset_peaks(self.start_ticks)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
