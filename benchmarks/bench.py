"""`make bench`: the sidecar beside the rows that define the field, one matrix, one report.

Owns: the benchmark matrix (targets × cases), its time budget and the lifetime of everything it
starts: a local upstream (nginx, else benchmarks/upstream_fallback.py) and a gRPC server, the
proxy (`sigv4proxy serve`: 1 and 2 workers, HTTP/1.1, h2c and TLS upstream, HTTP/1.1 and h2c
clients, one worker on one CPU), the field (nginx as a plain reverse proxy, the Go sidecar as
shipped, pooled and pooled over TLS from `--go-peers`, any `--peer`), and the load generators
(wrk, h2load, the constant-rate loader, the gRPC loop). It must never send traffic anywhere but 127.0.0.1, never
leave a process behind (process groups, try/finally, Ctrl-C included) and never report a run
with errors as a result.

    python benchmarks/bench.py [--quick] [--go-peers DIR]
                               [--peer 'CMD {port} {upstream}' --peer-name NAME]...

Writes bench-results/bench.md, bench.json and bench.png; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench_grpc import listening_port
from bench_load import (FULL_CASES, GRPC_CASES, INBOUND_CASES, LATTICE_HOST, ONE_CPU_CASES,
                        QUICK_CASES, QUICK_INBOUND_CASES, REQUEST_PATH, Case, LoadFiles,
                        h2load_argv, run_grpc, run_h2load, run_rate, run_wrk)
from bench_parse import ParseError, cpu_us_per_request
from bench_peers import GoPeer, go_peers, go_tls_peer
from bench_procs import (HarnessError, ManagedProcess, PinnedTree, TreeSampler, free_port,
                         http_probe, port_is_free, port_is_listening, run_bounded, split_cpus,
                         taskset_prefix, wait_until)
from bench_report import (FLOOR, ONE_CPU_MARK, POOLED_GO, Row, compute_ratios, floor_table, inbound_table,
                          markdown_table, one_cpu_table, peer_table, summary_table, write_chart,
                          write_json)
from bench_upstream import Upstream, ensure_debian_packages, nginx_proxy_argv, start_upstream
from bench_start import START_RUNS_IN_BENCH, StartRow, host_rows
from bench_targets import targets_table, verdicts
from bench_start import markdown as start_markdown

ROOT = Path(__file__).resolve().parent.parent
# Any values work against an upstream that does not verify; they are not secrets.
BENCH_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-not-real",
    "AWS_SESSION_TOKEN": "bench-token-not-real",
    "AWS_REGION": "us-west-2",
    "AWS_EC2_METADATA_DISABLED": "true",  # never reach for instance metadata (no off-box traffic)
    "AWS_CONFIG_FILE": "/nonexistent/sigv4proxy-bench",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sigv4proxy-bench",
}


@dataclass
class Target:
    """Something to drive load at: the upstream itself, our proxy, or a peer proxy."""

    name: str
    tool: str  # "wrk", "h2load" (h2c), "h2load-tls" (h2 over TLS) or "grpc" (the gRPC loop)
    baseline: str | None
    argv: list[str] | None = None  # None: a server already running (the upstream by default)
    upstream_port: int = 0  # direct targets: the port to hit
    skip_reason: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cases: tuple[Case, ...] | None = None  # None: the run's main matrix
    streams: int = 1  # h2load: streams per connection (concurrency / streams connections)
    # Limited to one CPU: the load generator and the upstream keep to these others meanwhile.
    loader_cpus: tuple[int, ...] = ()
    server_pid: int = 0  # a direct target whose server is not the upstream (the gRPC server)
    prepare: Callable[[int], list[str]] | None = None  # argv from its port (a config names it)


@dataclass
class GrpcServer:
    port: int
    pid: int


def find_proxy_command(explicit: str | None) -> list[str] | None:
    """`sigv4proxy` beside our interpreter (the venv), else on PATH; None without `serve`."""
    candidates = [explicit] if explicit else [str(Path(sys.executable).parent / "sigv4proxy"),
                                              shutil.which("sigv4proxy") or ""]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            try:
                probe = subprocess.run([candidate, "serve", "--help"], capture_output=True,
                                       timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0:
                return [candidate]
    return None


NO_PROXY = "`sigv4proxy serve` not available yet"


_INTERPRETER_PROBE = ("import importlib.machinery as m, pathlib, sys, sigv4proxy; "
                      "print(sys.version.split()[0], sys.executable, "
                      "'shared' if any('libpython' in l for l in open('/proc/self/maps')) "
                      "else 'static', sum(1 for p in pathlib.Path(sigv4proxy.__file__).parent.rglob('*') "
                      "if p.name.endswith(tuple(m.EXTENSION_SUFFIXES)) and '__mypyc' not in p.name))")


def proxy_interpreter(proxy: list[str] | None) -> str:
    """The Python our proxy runs on, for the report: version, path, whether libpython is a
    shared library (a build without PGO/LTO linked that way costs more per request), and how many
    of the package's modules are compiled (setup.py's build) in the copy it imports."""
    if not proxy:
        return "none"
    python = Path(proxy[0]).absolute().parent / "python"  # make bench names it relatively
    try:
        # cwd "/": the installed package, not a source tree's
        probe = subprocess.run([str(python), "-c", _INTERPRETER_PROBE], capture_output=True,
                               text=True, timeout=30, check=True, cwd="/")
        version, executable, linkage, compiled = probe.stdout.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return f"unknown ({python})"
    build = f"{compiled} modules compiled (mypyc)" if int(compiled) else "pure Python"
    return f"Python {version} ({executable}, libpython {linkage}), {build}"


def serve_argv(proxy: list[str], upstream_url: str, protocol: str, workers: int) -> list[str]:
    return [*proxy, "serve", "--listen", "127.0.0.1:{port}", "--admin", "127.0.0.1:{admin_port}",
            "--upstream", upstream_url, "--upstream-protocol", protocol,
            "--workers", str(workers), "--region", "us-west-2"]


def build_targets(args: argparse.Namespace, upstream: Upstream, have_h2load: bool,
                  grpc: GrpcServer | None = None) -> list[Target]:
    targets = [Target("direct-h1", "wrk", None, upstream_port=upstream.h1_port)]
    targets.append(Target("direct-h2c", "h2load", None, upstream_port=upstream.h2c_port,
                          skip_reason="" if have_h2load else "h2load missing (nghttp2-client)"))
    if not args.quick:  # the upstream's own ceiling over TLS, beside proxy-w2-h2tls
        targets.append(Target("direct-h2tls", "h2load-tls", None, upstream_port=upstream.h2tls_port,
                              skip_reason="" if have_h2load and upstream.h2tls_port else
                              "needs h2load and a TLS upstream (nginx and trustme)"))
    # The floor of a proxy hop: nginx proxying to the same upstream, two workers as ours.
    targets.append(Target(FLOOR, "wrk", "direct-h1", skip_reason="" if shutil.which("nginx")
                          else "needs nginx", prepare=functools.partial(
                              nginx_proxy_argv, Path(args.out) / "logs" / FLOOR,
                              upstream.h1_port, 2)))
    proxy = find_proxy_command(args.proxy_cmd)
    no_proxy = "" if proxy else NO_PROXY
    worker_counts = (1, 2)
    protocols = ("h1", "h2")
    combos = [(1, "h1"), (1, "h2"), (2, "h2")] if args.quick else [
        (w, p) for w in worker_counts for p in protocols] + [(2, "h2tls")]
    for workers, proto in combos:
        url = {"h1": upstream.h1_url, "h2": upstream.h2c_url, "h2tls": upstream.h2tls_url}[proto]
        skip = no_proxy
        if proto == "h2tls" and not upstream.h2tls_port:
            skip = "no TLS upstream (needs nginx and trustme)"
        argv = None if proxy is None else serve_argv(proxy, url, "http1" if proto == "h1" else "h2",
                                                     workers)
        if argv is not None and proto == "h2tls":
            argv += ["--ca-bundle", upstream.ca_file]
        targets.append(Target(f"proxy-w{workers}-{proto}", "wrk", "direct-h1", argv=argv,
                              skip_reason=skip, env=BENCH_ENV))
    # h2c clients (gRPC's way in) → proxy → h2c upstream: the same requests as proxy-w2-h2's, at
    # one stream per connection and at 16.
    inbound = QUICK_INBOUND_CASES if args.quick else INBOUND_CASES
    for name, streams, cases in (("proxy-w2-h2in", 1, None if args.inbound_h2 else inbound),
                                 ("proxy-w2-h2in-m16", 16, inbound)):
        argv = None if proxy is None else serve_argv(proxy, upstream.h2c_url, "h2", 2)
        targets.append(Target(name, "h2load", "direct-h2c", argv=argv, env=BENCH_ENV,
                              skip_reason="" if proxy and have_h2load else
                              "needs `sigv4proxy serve` and h2load", cases=cases, streams=streams))
    no_grpc = "" if grpc else "needs grpcio (the dev extra)"
    targets.append(Target("direct-grpc", "grpc", None, upstream_port=grpc.port if grpc else 0,
                          server_pid=grpc.pid if grpc else 0, skip_reason=no_grpc,
                          cases=GRPC_CASES))
    targets.append(Target("proxy-w2-grpc", "grpc", "direct-grpc", env=BENCH_ENV, cases=GRPC_CASES,
                          argv=None if proxy is None or grpc is None else serve_argv(
                              proxy, f"http://127.0.0.1:{grpc.port}", "h2", 2),
                          skip_reason=no_proxy or no_grpc))
    peers = go_peers(Path(args.go_peers)) if args.go_peers else []
    # The pooled Go sidecar over TLS, beside proxy-w2-h2tls (full run only, as that is).
    tls_peer = [] if args.quick or not args.go_peers else [go_tls_peer(Path(args.go_peers),
                                                                       upstream.ca_file)]
    for peer in peers + tls_peer:
        targets.append(Target(peer.name, "wrk", "direct-h1", argv=peer.argv,
                              env={**BENCH_ENV, **peer.env}, skip_reason=peer.skip_reason))
    targets += one_cpu_targets(args, upstream, proxy, peers, have_h2load)
    names = args.peer_name or []
    for i, command in enumerate(args.peer or []):
        name = names[i] if i < len(names) else f"peer{i + 1}"
        targets.append(Target(f"peer:{name}", "wrk", "direct-h1", argv=["/bin/sh", "-c", command],
                              env=BENCH_ENV))
    if args.only:
        kept = [t for t in targets if t.name in args.only]
        baselines = {t.baseline for t in kept}
        targets = [t for t in targets if t in kept or t.name in baselines
                   or (t.name.startswith("direct-") and t.tool != "grpc")]
    return targets


def one_cpu_targets(args: argparse.Namespace, upstream: Upstream, proxy: list[str] | None,
                    peers: list[GoPeer], have_h2load: bool = True) -> list[Target]:
    """One worker pinned to one CPU (taskset), with wrk, h2load, the rate loader and the upstream
    kept on the others: ours over HTTP/1.1 (and h2c in the full run) and the pooled Go sidecar;
    in the full run also h2c clients into the h2c one at its maximum (the inbound comparison
    without the load generator on the worker's CPU)."""
    split = split_cpus(os.sched_getaffinity(0))
    skip = ("needs two CPUs" if split is None else
            "needs taskset (util-linux)" if not shutil.which("taskset") else "")
    server_cpus, loader_cpus = split or ((), ())
    pin = taskset_prefix(server_cpus)
    wanted = [("h1", upstream.h1_url, "http1")] + ([] if args.quick else
                                                    [("h2", upstream.h2c_url, "h2")])
    targets = []
    for proto, url, protocol in wanted:
        targets.append(Target(f"proxy{ONE_CPU_MARK}-{proto}", "wrk", "direct-h1", env=BENCH_ENV,
                              argv=None if proxy is None else pin + serve_argv(proxy, url,
                                                                               protocol, 1),
                              skip_reason=skip or ("" if proxy else NO_PROXY),
                              cases=ONE_CPU_CASES, loader_cpus=loader_cpus))
    if not args.quick:
        targets.append(Target(f"proxy{ONE_CPU_MARK}-h2in", "h2load", "direct-h2c", env=BENCH_ENV,
                              argv=None if proxy is None else pin + serve_argv(
                                  proxy, upstream.h2c_url, "h2", 1),
                              skip_reason=skip or ("" if proxy and have_h2load else
                                                   "needs `sigv4proxy serve` and h2load"),
                              cases=ONE_CPU_CASES[:1], loader_cpus=loader_cpus))
    for peer in peers:
        if peer.name == POOLED_GO:
            targets.append(Target(f"{peer.name}{ONE_CPU_MARK}", "wrk", "direct-h1", env=BENCH_ENV,
                                  argv=pin + peer.argv, skip_reason=skip or peer.skip_reason,
                                  cases=ONE_CPU_CASES, loader_cpus=loader_cpus))
    return targets


def start_grpc_server(out: Path) -> tuple[ManagedProcess, GrpcServer] | None:
    """The gRPC echo server (bench_grpc.py serve; its log in `out`/logs), or None without
    grpcio."""
    if importlib.util.find_spec("grpc") is None:
        return None
    log = out / "logs" / "grpc-server.log"
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_grpc.py"), "serve"]
    process = ManagedProcess("grpc server", argv, log).start()
    try:
        wait_until(lambda: listening_port(log.read_text()) is not None, process, 30, "grpc server")
    except BaseException:
        process.stop()
        raise
    return process, GrpcServer(listening_port(log.read_text()), process.pid)


def fill_placeholders(argv: list[str], port: int | str, admin_port: int | str,
                      upstream: Upstream) -> list[str]:
    values = {"port": port, "admin_port": admin_port, "upstream": upstream.h1_url,
              "upstream_h2c": upstream.h2c_url, "upstream_host": "127.0.0.1",
              "upstream_port": upstream.h1_port, "upstream_h2c_port": upstream.h2c_port,
              "upstream_h2tls_port": upstream.h2tls_port, "ca_file": upstream.ca_file}
    filled = []
    for part in argv:  # plain replace: a peer's shell command may hold other braces
        for name, value in values.items():
            part = part.replace("{" + name + "}", str(value))
        filled.append(part)
    return filled


def preflight(port: int, files: LoadFiles, cases: tuple[Case, ...]) -> str:
    """One request per workload must come back 2xx before any load: '' when fine, else why."""
    for workload in dict.fromkeys(c.workload for c in cases):
        body_path = files.body(workload)
        body = body_path.read_bytes() if body_path else None
        try:
            status = http_probe(port, REQUEST_PATH, host=LATTICE_HOST, method=workload.method,
                                body=body, timeout=15)
        except OSError as exc:
            return f"preflight {workload.name}: {type(exc).__name__}"
        if not 200 <= status < 300:
            return f"preflight {workload.name}: HTTP {status}"
    return ""


def preflight_h2(port: int, files: LoadFiles, cases: tuple[Case, ...], tls: bool = False) -> str:
    """The same check over h2c (or h2 over TLS), with h2load (-n: a fixed count, no duration)."""
    for workload in dict.fromkeys(c.workload for c in cases):
        out = run_bounded(h2load_argv(port, Case(workload, 1), 1, files, None, requests=1, tls=tls),
                          timeout_s=30)
        if "1 succeeded" not in out or "1 2xx" not in out:
            return f"preflight {workload.name} over {'TLS' if tls else 'h2c'} failed"
    return ""


def preflight_grpc(port: int, cases: tuple[Case, ...]) -> str:
    """One unary call must come back right."""
    try:
        result, _ = run_grpc(port, cases[0], 10, max_calls=1)
    except (HarnessError, ParseError) as exc:
        return f"preflight gRPC: {str(exc).splitlines()[0]}"
    return "" if result.valid else "preflight gRPC: the call failed or came back wrong"


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.cases = QUICK_CASES if args.quick else FULL_CASES  # the main matrix
        self.duration = args.duration or (2.0 if args.quick else 5.0)
        self.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
        self.budget = args.budget or 0.0  # 0: set from the planned runs once targets are known
        self.started = time.monotonic()
        self.files = LoadFiles(workdir / "load")
        self.workdir = workdir
        self.rows: list[Row] = []
        self.start_rows: list[StartRow] = []
        self.upstream_pid = 0
        self.upstream_h1_port = 0  # the load side's control: the rate loader straight to it

    @property
    def per_run_s(self) -> float:
        return self.duration + self.warmup + 1.5

    def cases_of(self, target: Target) -> tuple[Case, ...]:
        return target.cases if target.cases is not None else self.cases

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started + self.per_run_s > self.budget

    def skip_all(self, target: Target, reason: str) -> None:
        """Flags every case of `target` (and returns None, for `start_target`)."""
        for case in self.cases_of(target):
            self.rows.append(Row(target.name, case.label, target.tool, target.baseline,
                                 problem=reason))

    def run_targets(self, targets: list[Target], upstream: Upstream) -> None:
        """All targets start first; then each case runs on every target that has it, in turn.
        The machine's speed drifts within a run (±20 % and more here): case-major order spreads
        that drift over all targets, where target-major order handed whole slow minutes to
        whichever target ran then (a peer measured eight minutes after ours is no side-by-side
        comparison). A constant-rate case comes after the maximum it takes a share of."""
        self.upstream_pid = upstream.process.pid
        self.upstream_h1_port = upstream.h1_port
        if not self.budget:  # the planned runs with a fifth to spare, and a minute for starting
            # (a constant-rate case runs twice: the row, then the load side alone)
            planned = sum(len(self.cases_of(t)) + sum(1 for c in self.cases_of(t) if c.rate_of_max)
                          for t in targets if not t.skip_reason)
            self.budget = planned * self.per_run_s * 1.2 + 60
        all_cases = list(dict.fromkeys(c for t in targets for c in self.cases_of(t)))
        with contextlib.ExitStack() as stack:
            live = []
            for target in targets:
                started = self.start_target(target, upstream, stack)
                if started is not None:
                    live.append((target, *started))
            for case in all_cases:
                for target, port, root_pid in live:
                    if case in self.cases_of(target):
                        self.rows.append(self.run_case(target, case, port, root_pid))
        target_order = {t.name: i for i, t in enumerate(targets)}
        case_order = {c.label: i for i, c in enumerate(all_cases)}
        self.rows.sort(key=lambda r: (target_order[r.target], case_order[r.case]))

    def start_target(self, target: Target, upstream: Upstream,
                     stack: contextlib.ExitStack) -> tuple[int, int] | None:
        """Start `target` (stopped when `stack` closes; a direct target is a running server)
        and check it answers each workload: (port, root pid), or None with its rows flagged."""
        if target.skip_reason:
            return self.skip_all(target, f"skipped: {target.skip_reason}")
        if target.argv is None and target.prepare is None:
            port, root_pid = target.upstream_port, target.server_pid or upstream.process.pid
        else:
            port, admin_port = free_port(), free_port()
            for p in (port, admin_port):
                if not port_is_free(p):
                    return self.skip_all(target, f"port {p} is taken")
            if target.prepare is not None:
                argv = target.prepare(port)
            else:
                argv = fill_placeholders(target.argv, port, admin_port, upstream)
            env = {**os.environ, **target.env}
            log = Path(self.args.out) / "logs" / f"{target.name.replace(':', '_')}.log"
            proc = ManagedProcess(target.name, argv, log, env=env).start()
            stack.callback(proc.stop)
            try:
                wait_until(lambda: port_is_listening(port), proc, 30, target.name)
            except HarnessError as exc:
                return self.skip_all(target, f"did not start ({exc.args[0].splitlines()[0]}); "
                                             f"see {log}")
            root_pid = proc.pid
        cases = self.cases_of(target)
        if target.tool == "wrk":
            problem = preflight(port, self.files, cases)
        elif target.tool == "grpc":
            problem = preflight_grpc(port, cases)
        else:
            problem = preflight_h2(port, self.files, cases, tls=target.tool == "h2load-tls")
        if problem:
            return self.skip_all(target, problem)
        return port, root_pid

    def runner(self, target: Target, case: Case, row: Row) -> Callable | None:
        """The load run for `case` on `target` (port, case, seconds, files) -> (result, output);
        None, with the row flagged, when a constant-rate case has no maximum to take a share of."""
        if case.rate_of_max:
            best = next((r for r in self.rows if r.target == target.name
                         and r.case == case.max_case.label), None)
            if best is None or not best.valid:
                row.problem = f"skipped: no valid {case.max_case.label} run to take a share of"
                return None
            row.offered_rps = best.rps * case.rate_of_max
            return functools.partial(run_rate, rate=row.offered_rps, cpus=target.loader_cpus)
        if target.tool == "grpc":
            return lambda port, case, seconds, _files: run_grpc(port, case, seconds)
        if target.tool == "wrk":
            return functools.partial(run_wrk, cpus=target.loader_cpus)
        return functools.partial(run_h2load, tls=target.tool == "h2load-tls",
                                 streams=target.streams, cpus=target.loader_cpus)

    def run_case(self, target: Target, case: Case, port: int, root_pid: int) -> Row:
        row = Row(target.name, case.label, target.tool, target.baseline)
        if self.out_of_time():
            row.problem = f"skipped: time budget {self.budget:.0f}s reached"
            return row
        run = self.runner(target, case, row)
        if run is None:
            return row
        print(f"bench: {target.name:<20} {case.label:<20}", file=sys.stderr, end="", flush=True)
        try:
            with PinnedTree(self.upstream_pid, target.loader_cpus):
                if self.warmup:
                    run(port, case, self.warmup, self.files)
                with TreeSampler(root_pid) as sampler:
                    result, _output = run(port, case, self.duration, self.files)
        except (HarnessError, ParseError) as exc:
            row.problem = str(exc).splitlines()[0][:120]
            print(f" {row.problem}", file=sys.stderr)
            return row
        row.requests, row.rps = result.requests, result.rps
        row.p50_us, row.p99_us = result.p50_us, result.p99_us
        row.non_2xx, row.socket_errors = result.non_2xx, result.socket_errors
        row.cpu_us_per_req = cpu_us_per_request(sampler.cpu_seconds(), result.requests)
        row.peak_rss_kib = sampler.peak_rss_kib()
        row.largest_process_rss_kib = sampler.largest_process_rss_kib()
        print(f" {row.rps:>10,.0f} rps  p99 {row.p99_us / 1000:7.2f} ms  {row.check}",
              file=sys.stderr)
        if case.rate_of_max:
            self.load_side_alone(target, case, row)
        return row

    def load_side_alone(self, target: Target, case: Case, row: Row) -> None:
        """The control of a constant-rate row, right after it: the rate loader straight to the
        upstream at the same rate, both on the same CPUs as in the row, no proxy. What the load
        side alone can hold: a row whose own control could not keep up measured the load side,
        not the server between (bench_targets judges no such row)."""
        if not self.upstream_h1_port or row.offered_rps is None:
            return
        print(f"bench: {'(load side alone)':<20} {case.label:<20}", file=sys.stderr, end="", flush=True)
        try:
            with PinnedTree(self.upstream_pid, target.loader_cpus):
                result, _output = run_rate(self.upstream_h1_port, case, self.duration, self.files,
                                           rate=row.offered_rps, cpus=target.loader_cpus)
        except (HarnessError, ParseError) as exc:
            row.load_side_rps = 0.0  # tried and failed: never a figure
            print(f" {str(exc).splitlines()[0][:120]}", file=sys.stderr)
            return
        errors = result.non_2xx + result.socket_errors
        row.load_side_rps = result.rps if not errors else 0.0  # 0: it failed outright
        row.load_side_p99_us = result.p99_us
        print(f" {result.rps:>10,.0f} rps  p99 {result.p99_us / 1000:7.2f} ms"
              + (f"  {errors} errors" if errors else ""), file=sys.stderr)

    def run(self) -> int:
        args = self.args
        if not ensure_debian_packages("wrk", ["wrk"], not args.no_install):
            print("bench: wrk is missing (apt-get install wrk, as root)", file=sys.stderr)
            return 2
        have_h2load = ensure_debian_packages("h2load", ["nghttp2-client"], not args.no_install)
        upstream = start_upstream(self.workdir, not args.no_install, args.fallback_upstream)
        grpc_server = None
        try:
            # Start-up first (bench_start.py alone: `make bench-start`): peers with every
            # placeholder filled but the ports, which each start run picks afresh.
            names = args.peer_name or []
            peers = [(names[i] if i < len(names) else f"peer{i + 1}",
                      fill_placeholders([command], "{port}", "{admin_port}", upstream)[0])
                     for i, command in enumerate(args.peer or [])]
            self.start_rows = host_rows(START_RUNS_IN_BENCH, Path(args.out) / "logs", peers)
            grpc_server = start_grpc_server(Path(args.out))
            targets = build_targets(args, upstream, have_h2load,
                                    grpc_server[1] if grpc_server else None)
            self.run_targets(targets, upstream)
        finally:
            if grpc_server is not None:
                grpc_server[0].stop()
            upstream.process.stop()
        return self.report(upstream.kind)

    def report(self, upstream_kind: str) -> int:
        compute_ratios(self.rows)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        mode = "quick" if self.args.quick else "full"
        interpreter = proxy_interpreter(find_proxy_command(self.args.proxy_cmd))
        title = (f"sigv4proxy bench ({mode}): upstream {upstream_kind}, {self.duration:.0f}s per "
                 f"case, {os.cpu_count()} CPUs, ours on {interpreter}")
        concurrency = 32 if self.args.quick else 128
        sections = [
            (f"The field at c{concurrency} (two workers; Go with GOMAXPROCS at its default)",
             summary_table(self.rows, [f"GET c{concurrency}", f"POST 4KiB c{concurrency}"])),
            ("Round-two targets (issue 28; judged from this run's rows, the c128 ones need the "
             "full run)", targets_table(self.rows)),
            ("Inbound h2c and gRPC", inbound_table(self.rows)),
            ("One worker on one CPU (taskset; wrk, the rate loader and the upstream on the "
             "other CPU; p99 at a constant rate is timed from when each request was due; the load "
             "side alone is the same rate from the rate loader straight to the upstream, right "
             "after, no proxy: a row whose load side could not hold its rate is not judged)",
             one_cpu_table(self.rows)),
            ("Every row", "\n\n".join(filter(None, [markdown_table(self.rows),
                                                     floor_table(self.rows),
                                                     peer_table(self.rows)]))),
        ]
        if self.start_rows:
            sections.append(("Start-up", start_markdown(self.start_rows, START_RUNS_IN_BENCH)))
        body = "\n\n".join(f"## {head}\n\n{text}" for head, text in sections if text)
        notes = NOTES
        (out / "bench.md").write_text(f"# {title}\n\n{body}\n\n{notes}\n")
        meta = {"mode": mode, "upstream": upstream_kind, "duration_s": self.duration,
                "warmup_s": self.warmup, "cpus": os.cpu_count(), "host_header": LATTICE_HOST,
                "proxy_python": interpreter,
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes}
        write_json(out / "bench.json", meta, self.rows,
                   {"round_two_targets": [asdict(v) for v in verdicts(self.rows)]})
        chart_problem = write_chart(out / "bench.png", self.rows, title,
                                    [c.label for c in self.cases])
        print(f"# {title}\n\n{body}\n\n{notes}")
        print(f"\nbench: wrote {out}/bench.md, bench.json" +
              (f"; no chart: {chart_problem}" if chart_problem else ", bench.png") +
              f" in {time.monotonic() - self.started:.0f}s", file=sys.stderr)
        failed = [r for r in self.rows if not r.valid and not r.problem.startswith("skipped")]
        return 1 if failed or any(r.problem for r in self.start_rows) else 0


NOTES = ("Ratios \"vs direct\" divide by direct-h1 (wrk straight to the upstream over HTTP/1.1) "
         "for the same case (the h2c-inbound rows by direct-h2c, h2load straight to the upstream "
         "over h2c; direct-h2tls is the same over TLS, the ceiling for proxy-w2-h2tls). "
         f"`{FLOOR}` is nginx as a plain keep-alive reverse proxy (two workers, no signing) in "
         "front of the same upstream: the floor of a proxy hop. peer:go is the Go "
         "aws-sigv4-proxy as shipped (Go's idle pool of 2 connections per host), peer:go-pooled "
         "the same with its idle pool raised to 1024 (docs/performance.md), peer:go-pooled-tls "
         "that pooled build to the upstream's TLS port (h2 by ALPN, as proxy-w2-h2tls, whose "
         "yardstick it is). CPU and peak RSS are the measured server's process tree (upstream "
         "for direct rows, the proxy for the others); peak RSS is per case (VmHWM reset at its "
         "start, summed over processes); largest process is one process's peak (the fullest "
         "worker). FLAGGED rows had errors and are not results. The machine may be shared: compare ratios within one run.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter runs (< 3 min)")
    parser.add_argument("--peer", action="append",
                        help="another proxy's command (shell); placeholders {port} {admin_port} "
                             "{upstream} {upstream_h2c} {upstream_host} {upstream_port} "
                             "{upstream_h2c_port} {upstream_h2tls_port} {ca_file} (nginx's "
                             "h2-over-TLS port and the CA that signed it)")
    parser.add_argument("--peer-name", action="append", help="name for the matching --peer")
    parser.add_argument("--go-peers", metavar="DIR",
                        help="run the Go aws-sigv4-proxy built into DIR as peer:go (as shipped) "
                             "and peer:go-pooled (idle pool raised), also on one CPU and (full "
                             "run) over TLS as peer:go-pooled-tls; docs/performance.md says how "
                             "to build them")
    parser.add_argument("--proxy-cmd", help="path to the sigv4proxy executable")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each run")
    parser.add_argument("--budget", type=float, help="stop starting runs after this many seconds")
    parser.add_argument("--only", action="append",
                        help="run only this target (repeatable, e.g. proxy-w2-h2tls); the direct "
                             "baselines always run")
    parser.add_argument("--inbound-h2", action="store_true",
                        help="run proxy-w2-h2in (h2load into the proxy over h2c, one stream per "
                             "connection) over the whole matrix, not only its inbound cases; "
                             "adds about a minute")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--no-install", action="store_true", help="never apt-get install tools")
    parser.add_argument("--fallback-upstream", action="store_true",
                        help="use the Python upstream even when nginx is available")
    return parser.parse_args(argv)


def _sigterm_as_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    # Even when started in the background (where shells ignore SIGINT), Ctrl-C must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="sigv4proxy-bench-") as tmp:
        try:
            return Bench(args, Path(tmp)).run()
        except KeyboardInterrupt:
            print("\nbench: interrupted; every process it started was stopped", file=sys.stderr)
            return 130
        except HarnessError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
