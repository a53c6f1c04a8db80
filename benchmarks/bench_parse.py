"""Pure parsers for `make bench`: wrk and h2load output, /proc samples, CPU and RSS accounting.

Owns: turning tool output and /proc text into numbers. It must never run a process, touch a
socket or read a clock: every function takes text or numbers and returns numbers, so the tests
can feed it captured output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


class ParseError(ValueError):
    """A tool's output did not have the shape we rely on (e.g. wrk could not connect)."""


# wrk prints durations with these units (format_time_us in wrk's units.c).
_TIME_UNITS_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0, "m": 60_000_000.0, "h": 3_600_000_000.0}


def duration_to_us(text: str) -> float:
    """'653.00us' / '1.48ms' / '1.30s' / '2.00m' -> microseconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s|m|h)\s*", text)
    if not match:
        raise ParseError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_US[match.group(2)]


@dataclass(frozen=True)
class LoadResult:
    """What one load-generator run measured, tool-independent."""

    requests: int  # completed requests (any status)
    duration_s: float
    rps: float
    p50_us: float
    p99_us: float
    non_2xx: int  # responses that were not 2xx (as far as the tool can tell)
    socket_errors: int  # connect/read/write errors and timeouts

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.errors == 0


_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),", re.M)
_WRK_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_WRK_PCT = re.compile(r"^\s+(50|99)%\s+([0-9.]+\s*(?:us|ms|s|m|h))\s*$", re.M)
_WRK_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_WRK_SOCKET = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)


def parse_wrk(text: str) -> LoadResult:
    """Parse `wrk --latency` output. wrk counts statuses > 399 as 'Non-2xx or 3xx'."""
    total = _WRK_TOTAL.search(text)
    rps = _WRK_RPS.search(text)
    if not total or not rps:
        first = text.strip().splitlines()[:1]
        raise ParseError(f"wrk printed no summary: {first[0] if first else 'no output'!r}")
    percentiles = {m.group(1): duration_to_us(m.group(2)) for m in _WRK_PCT.finditer(text)}
    if set(percentiles) != {"50", "99"}:
        raise ParseError("wrk output has no latency distribution (run it with --latency)")
    non_2xx = _WRK_NON2XX.search(text)
    sockets = _WRK_SOCKET.search(text)
    return LoadResult(
        requests=int(total.group(1)),
        duration_s=duration_to_us(total.group(2) + total.group(3)) / 1e6,
        rps=float(rps.group(1)),
        p50_us=percentiles["50"],
        p99_us=percentiles["99"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
    )


_H2_FINISHED = re.compile(r"^finished in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+) req/s", re.M)
_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.M,
)
_H2_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (pct in 0..100)."""
    if not sorted_values:
        raise ParseError("no samples for a percentile")
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil without floats drifting
    return float(sorted_values[int(rank) - 1])


def parse_h2load(text: str, log_lines: list[str]) -> LoadResult:
    """Parse h2load's summary plus its `--log-file` (start µs, status, duration µs per request).

    h2load prints no percentiles, so p50/p99 come from the per-request log.
    """
    finished = _H2_FINISHED.search(text)
    counts = _H2_REQUESTS.search(text)
    statuses = _H2_STATUS.search(text)
    if not finished or not counts or not statuses:
        raise ParseError("h2load printed no summary")
    durations: list[float] = []
    for line in log_lines:
        fields = line.split("\t")
        if len(fields) == 3 and fields[2].strip():
            durations.append(float(fields[2]))
    durations.sort()
    _total, _started, done, _ok, failed, errored, timeout = (int(g) for g in counts.groups())
    two_xx = int(statuses.group(1))
    return LoadResult(
        requests=done,
        duration_s=duration_to_us(finished.group(1) + finished.group(2)) / 1e6,
        rps=float(finished.group(3)),
        p50_us=percentile(durations, 50) if durations else 0.0,
        p99_us=percentile(durations, 99) if durations else 0.0,
        # `done` counts answered requests; `failed` (errored and timed-out ones) were not answered.
        non_2xx=max(0, done - two_xx),
        socket_errors=max(failed, errored + timeout),
    )


def parse_json_result(text: str, tool: str) -> LoadResult:
    """The one JSON line that rate_loader.py and `bench_grpc.py loop` print last (the same keys
    as LoadResult; the rate loader adds `offered_rps`, which the caller already knows)."""
    lines = text.strip().splitlines()
    try:
        record = json.loads(lines[-1])
        return LoadResult(requests=int(record["requests"]), duration_s=float(record["duration_s"]),
                          rps=float(record["rps"]), p50_us=float(record["p50_us"]),
                          p99_us=float(record["p99_us"]), non_2xx=int(record["non_2xx"]),
                          socket_errors=int(record["socket_errors"]))
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        first = lines[0] if lines else "no output"
        raise ParseError(f"{tool} printed no result: {first!r}") from exc


# ---- /proc accounting -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    cpu_ticks: int  # utime + stime, in clock ticks
    state: str = "R"  # "Z" for a zombie: dead, waiting to be reaped


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat. The command name may hold spaces and ')' so split at the last ')'."""
    head, sep, rest = text.rpartition(")")
    if not sep:
        raise ParseError("not a /proc/<pid>/stat line")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return ProcStat(pid=pid, ppid=int(fields[1]), pgrp=int(fields[2]),
                    cpu_ticks=int(fields[11]) + int(fields[12]), state=fields[0])


def parse_proc_status_memory(text: str) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB from /proc/<pid>/status; (0, 0) for a zombie or kernel thread."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in values:
            values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def tree_members(stats: list[ProcStat], root_pid: int) -> set[int]:
    """Pids in the root's process group or descending from the root (workers may fork later)."""
    members = {s.pid for s in stats if s.pgrp == root_pid or s.pid == root_pid}
    children: dict[int, list[int]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s.pid)
    # Walk descendants of every member: a group member's child may have left the group (setsid).
    stack, seen = list(members), set(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def cpu_seconds_between(before: dict[int, int], after: dict[int, int], clk_tck: int) -> float:
    """CPU seconds the tree used between two {pid: ticks} snapshots.

    A pid that appears only `after` started during the window: all its ticks count. A pid gone by
    `after` is lost (its final ticks cannot be read); the caller samples often enough to notice.
    """
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return max(0, ticks) / clk_tck


def cpu_us_per_request(cpu_seconds: float, requests: int) -> float | None:
    return cpu_seconds * 1e6 / requests if requests > 0 else None


def peak_rss_by_pid(samples: list[dict[int, tuple[int, int]]]) -> dict[int, int]:
    """Per pid the max of its sampled VmRSS and VmHWM. The sampler resets VmHWM when a case
    starts, so this is the case's peak where the kernel allows it."""
    per_pid: dict[int, int] = {}
    for sample in samples:
        for pid, (rss, hwm) in sample.items():
            per_pid[pid] = max(per_pid.get(pid, 0), rss, hwm)
    return per_pid


def peak_rss_kib(samples: list[dict[int, tuple[int, int]]]) -> int:
    """Peak resident memory of a process tree, summed over pids (workers each hold their own)."""
    return sum(peak_rss_by_pid(samples).values())


def largest_process_rss_kib(samples: list[dict[int, tuple[int, int]]]) -> int:
    """The largest single process's peak: for a proxy with workers, the fullest worker."""
    return max(peak_rss_by_pid(samples).values(), default=0)
