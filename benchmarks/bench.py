"""`make bench`: the sidecar against a direct-to-upstream baseline, one matrix, one table.

Owns: the benchmark matrix (targets × cases), its time budget and the lifetime of everything it
starts: a local upstream (nginx, else benchmarks/upstream_fallback.py), the proxy (`sigv4proxy
serve`, 1 and 2 workers, HTTP/1.1 and h2 upstream), any `--peer` proxies, and wrk / h2load.
It must never send traffic anywhere but 127.0.0.1, never leave a process behind (process groups,
try/finally, Ctrl-C included) and never report a run with errors as a result.

    python benchmarks/bench.py [--quick] [--peer 'CMD {port} {upstream}' --peer-name NAME]...

Writes bench-results/bench.md, bench.json and bench.png; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_load import (FULL_CASES, LATTICE_HOST, QUICK_CASES, REQUEST_PATH, Case, LoadFiles,
                        h2load_argv, run_h2load, run_wrk)
from bench_parse import ParseError, cpu_us_per_request
from bench_procs import (HarnessError, ManagedProcess, TreeSampler, free_port, http_probe,
                         port_is_free, port_is_listening, run_bounded, wait_until)
from bench_report import Row, compute_ratios, markdown_table, peer_table, write_chart, write_json
from bench_start import START_RUNS_IN_BENCH, StartRow, host_rows
from bench_start import markdown as start_markdown
from bench_upstream import Upstream, ensure_debian_packages, start_upstream

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
    tool: str  # "wrk", "h2load" (h2c) or "h2load-tls" (h2 over TLS)
    baseline: str | None
    argv: list[str] | None = None  # None: the upstream itself (already running)
    upstream_port: int = 0  # direct targets: the port to hit
    skip_reason: str = ""
    env: dict[str, str] = field(default_factory=dict)


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


def build_targets(args: argparse.Namespace, upstream: Upstream, have_h2load: bool) -> list[Target]:
    targets = [Target("direct-h1", "wrk", None, upstream_port=upstream.h1_port)]
    targets.append(Target("direct-h2c", "h2load", None, upstream_port=upstream.h2c_port,
                          skip_reason="" if have_h2load else "h2load missing (nghttp2-client)"))
    if not args.quick:  # the upstream's own ceiling over TLS, beside proxy-w2-h2tls
        targets.append(Target("direct-h2tls", "h2load-tls", None, upstream_port=upstream.h2tls_port,
                              skip_reason="" if have_h2load and upstream.h2tls_port else
                              "needs h2load and a TLS upstream (nginx and trustme)"))
    proxy = find_proxy_command(args.proxy_cmd)
    worker_counts = (1, 2)
    protocols = ("h1", "h2")
    combos = [(1, "h1"), (1, "h2"), (2, "h2")] if args.quick else [
        (w, p) for w in worker_counts for p in protocols] + [(2, "h2tls")]
    for workers, proto in combos:
        url = {"h1": upstream.h1_url, "h2": upstream.h2c_url, "h2tls": upstream.h2tls_url}[proto]
        skip = "" if proxy else "`sigv4proxy serve` not available yet"
        if proto == "h2tls" and not upstream.h2tls_port:
            skip = "no TLS upstream (needs nginx and trustme)"
        argv = None if proxy is None else [
            *proxy, "serve", "--listen", "127.0.0.1:{port}", "--admin", "127.0.0.1:{admin_port}",
            "--upstream", url, "--upstream-protocol", "http1" if proto == "h1" else "h2",
            "--workers", str(workers), "--region", "us-west-2"]
        if argv is not None and proto == "h2tls":
            argv += ["--ca-bundle", upstream.ca_file]
        targets.append(Target(f"proxy-w{workers}-{proto}", "wrk", "direct-h1", argv=argv,
                              skip_reason=skip, env=BENCH_ENV))
    if args.inbound_h2 and not args.quick:  # h2 clients (gRPC-like) → proxy → h2c upstream
        argv = None if proxy is None else [
            *proxy, "serve", "--listen", "127.0.0.1:{port}", "--admin", "127.0.0.1:{admin_port}",
            "--upstream", upstream.h2c_url, "--upstream-protocol", "h2", "--workers", "2",
            "--region", "us-west-2"]
        targets.append(Target("proxy-w2-h2in", "h2load", "direct-h2c", argv=argv,
                              skip_reason="" if proxy and have_h2load else
                              "needs `sigv4proxy serve` and h2load", env=BENCH_ENV))
    names = args.peer_name or []
    for i, command in enumerate(args.peer or []):
        name = names[i] if i < len(names) else f"peer{i + 1}"
        targets.append(Target(f"peer:{name}", "wrk", "direct-h1", argv=["/bin/sh", "-c", command],
                              env=BENCH_ENV))
    if args.only:
        targets = [t for t in targets if t.name.startswith("direct-") or t.name in args.only]
    return targets


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


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.cases = QUICK_CASES if args.quick else FULL_CASES
        self.duration = args.duration or (2.0 if args.quick else 5.0)
        self.warmup = args.warmup if args.warmup is not None else 1.0
        # Each extra target (inbound h2, a peer) runs the whole case list: about 75 s more.
        extra_targets = (args.inbound_h2 and not args.quick) + len(args.peer or ())
        self.budget = args.budget or ((110.0 if args.quick else 570.0) + 75.0 * extra_targets)
        self.started = time.monotonic()
        self.files = LoadFiles(workdir / "load")
        self.workdir = workdir
        self.rows: list[Row] = []
        self.start_rows: list[StartRow] = []

    def out_of_time(self) -> bool:
        per_run = self.duration + self.warmup + 1.5
        return time.monotonic() - self.started + per_run > self.budget

    def skip_all(self, target: Target, reason: str) -> None:
        """Flags every case of `target` (and returns None, for `start_target`)."""
        for case in self.cases:
            self.rows.append(Row(target.name, case.label, target.tool, target.baseline,
                                 problem=reason))

    def run_targets(self, targets: list[Target], upstream: Upstream) -> None:
        """All targets start first; then each case runs on every target in turn. The machine's
        speed drifts within a run (±20 % and more here): case-major order spreads that drift over
        all targets, where target-major order handed whole slow minutes to whichever target ran
        then (a peer measured eight minutes after ours is no side-by-side comparison)."""
        with contextlib.ExitStack() as stack:
            live = []
            for target in targets:
                started = self.start_target(target, upstream, stack)
                if started is not None:
                    live.append((target, *started))
            for case in self.cases:
                for target, port, root_pid in live:
                    self.rows.append(self.run_case(target, case, port, root_pid))
        target_order = {t.name: i for i, t in enumerate(targets)}
        case_order = {c.label: i for i, c in enumerate(self.cases)}
        self.rows.sort(key=lambda r: (target_order[r.target], case_order[r.case]))

    def start_target(self, target: Target, upstream: Upstream,
                     stack: contextlib.ExitStack) -> tuple[int, int] | None:
        """Start `target` (stopped when `stack` closes; a direct target is the running upstream)
        and check it answers each workload: (port, root pid), or None with its rows flagged."""
        if target.skip_reason:
            return self.skip_all(target, f"skipped: {target.skip_reason}")
        if target.argv is None:
            port, root_pid = target.upstream_port, upstream.process.pid
        else:
            port, admin_port = free_port(), free_port()
            for p in (port, admin_port):
                if not port_is_free(p):
                    return self.skip_all(target, f"port {p} is taken")
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
        if target.tool == "wrk":
            problem = preflight(port, self.files, self.cases)
        else:
            problem = preflight_h2(port, self.files, self.cases, tls=target.tool == "h2load-tls")
        if problem:
            return self.skip_all(target, problem)
        return port, root_pid

    def run_case(self, target: Target, case: Case, port: int, root_pid: int) -> Row:
        row = Row(target.name, case.label, target.tool, target.baseline)
        if self.out_of_time():
            row.problem = f"skipped: time budget {self.budget:.0f}s reached"
            return row
        run = {"wrk": run_wrk, "h2load": run_h2load,
               "h2load-tls": functools.partial(run_h2load, tls=True)}[target.tool]
        print(f"bench: {target.name:<16} {case.label:<16}", file=sys.stderr, end="", flush=True)
        try:
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
        return row

    def run(self) -> int:
        args = self.args
        if not ensure_debian_packages("wrk", ["wrk"], not args.no_install):
            print("bench: wrk is missing (apt-get install wrk, as root)", file=sys.stderr)
            return 2
        have_h2load = ensure_debian_packages("h2load", ["nghttp2-client"], not args.no_install)
        upstream = start_upstream(self.workdir, not args.no_install, args.fallback_upstream)
        try:
            # Start-up first (bench_start.py alone: `make bench-start`): peers with every
            # placeholder filled but the ports, which each start run picks afresh.
            names = args.peer_name or []
            peers = [(names[i] if i < len(names) else f"peer{i + 1}",
                      fill_placeholders([command], "{port}", "{admin_port}", upstream)[0])
                     for i, command in enumerate(args.peer or [])]
            self.start_rows = host_rows(START_RUNS_IN_BENCH, Path(args.out) / "logs", peers)
            targets = build_targets(args, upstream, have_h2load)
            self.run_targets(targets, upstream)
        finally:
            upstream.process.stop()
        return self.report(upstream.kind)

    def report(self, upstream_kind: str) -> int:
        compute_ratios(self.rows)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        mode = "quick" if self.args.quick else "full"
        title = (f"sigv4proxy bench ({mode}): upstream {upstream_kind}, {self.duration:.0f}s per "
                 f"case, {os.cpu_count()} CPUs")
        notes = ("Ratios divide by direct-h1 (wrk straight to the upstream over HTTP/1.1) for the "
                 "same case (proxy-w2-h2in, h2load into the proxy over h2c, by direct-h2c); "
                 "direct-h2c and direct-h2tls are h2load straight to the upstream over "
                 "h2c and over TLS (the ceiling for proxy-w2-h2tls). CPU and peak "
                 "RSS are the measured server's process tree (upstream for direct rows, proxy for "
                 "the others); peak RSS is per case (VmHWM reset at its start, summed over "
                 "processes); largest process is one process's peak (the fullest worker). "
                 "FLAGGED rows had errors and are not results.")
        table = markdown_table(self.rows)
        versus = peer_table(self.rows)
        if versus:
            table += "\n\n" + versus
        if self.start_rows:
            table += "\n\n## Start-up\n\n" + start_markdown(self.start_rows, START_RUNS_IN_BENCH)
        (out / "bench.md").write_text(f"# {title}\n\n{table}\n\n{notes}\n")
        meta = {"mode": mode, "upstream": upstream_kind, "duration_s": self.duration,
                "warmup_s": self.warmup, "cpus": os.cpu_count(), "host_header": LATTICE_HOST,
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes}
        write_json(out / "bench.json", meta, self.rows)
        chart_problem = write_chart(out / "bench.png", self.rows, title)
        print(f"# {title}\n\n{table}\n\n{notes}")
        print(f"\nbench: wrote {out}/bench.md, bench.json" +
              (f"; no chart: {chart_problem}" if chart_problem else ", bench.png"), file=sys.stderr)
        failed = [r for r in self.rows if not r.valid and not r.problem.startswith("skipped")]
        return 1 if failed or any(r.problem for r in self.start_rows) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter runs (< 2 min)")
    parser.add_argument("--peer", action="append",
                        help="another proxy's command (shell); placeholders {port} {admin_port} "
                             "{upstream} {upstream_h2c} {upstream_host} {upstream_port} "
                             "{upstream_h2c_port} {upstream_h2tls_port} {ca_file} (nginx's "
                             "h2-over-TLS port and the CA that signed it)")
    parser.add_argument("--peer-name", action="append", help="name for the matching --peer")
    parser.add_argument("--proxy-cmd", help="path to the sigv4proxy executable")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each run")
    parser.add_argument("--budget", type=float, help="stop starting runs after this many seconds")
    parser.add_argument("--only", action="append",
                        help="run only this target (repeatable, e.g. proxy-w2-h2tls); the direct "
                             "baselines always run")
    parser.add_argument("--inbound-h2", action="store_true",
                        help="also drive the proxy with h2load over h2c (clients speaking HTTP/2, "
                             "as gRPC does), against direct-h2c; adds about a minute")
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
