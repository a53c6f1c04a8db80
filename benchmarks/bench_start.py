"""The start-up report of `make bench` and `make image`: how long from process start until
`/readyz` answers 200, and what each process holds idle, for one worker and for two workers with
their supervisor; beside any `--peer` (time until it accepts connections: the Go sidecar has no
readiness endpoint); and, with `--image`, the same inside a container of the image.

Owns: those measurements and their table. Must never: send traffic off 127.0.0.1, or leave a
process or container behind (each run is stopped in a finally, its whole process group or the
container removed).

    python benchmarks/bench_start.py [--runs 5] [--image sigv4proxy:latest] [--peer CMD --peer-name N]...
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench_procs import (CLK_TCK, LOOPBACK, ManagedProcess, TreeSampler, free_port, port_is_listening,
                         tree_rss_kib)

ROOT = Path(__file__).resolve().parent.parent
# Fixed keys: the start needs credentials, and nothing is signed for anyone; not secrets.
START_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDSTARTEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "start-secret-not-real",
    "AWS_REGION": "us-west-2",
    "AWS_EC2_METADATA_DISABLED": "true",  # never reach for instance metadata
    "AWS_CONFIG_FILE": "/nonexistent/sigv4proxy-start",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sigv4proxy-start",
}
READY_TIMEOUT_S = 30.0
POLL_S = 0.005
START_RUNS_IN_BENCH = 3
SETTLE_S = 1.0  # idle time before reading RSS: start-up garbage collected, credentials loaded
MIB = 1024


@dataclass
class StartRow:
    name: str
    ready_s: list[float] = field(default_factory=list)  # process start to ready, each run
    cpu_s: list[float] = field(default_factory=list)  # CPU the process tree used until ready
    run_to_ready_s: list[float] = field(default_factory=list)  # containers: `docker run` to ready
    rss_kib: dict[str, int] = field(default_factory=dict)  # role -> RSS (largest of that role)
    problem: str = ""

    def median(self, values: list[float]) -> str:
        return f"{statistics.median(values):.3f}" if values else "–"

    def markdown(self) -> str:
        rss = ", ".join(f"{role} {kib / MIB:.1f}" for role, kib in self.rss_kib.items()) or "–"
        spread = (f"{min(self.ready_s):.3f}–{max(self.ready_s):.3f}" if self.ready_s else "–")
        if self.problem:
            return f"| {self.name} | FAILED: {self.problem} | | | | |"
        return (f"| {self.name} | {self.median(self.ready_s)} | {spread} | {self.median(self.cpu_s)} | "
                f"{self.median(self.run_to_ready_s)} | {rss} |")


def readyz_ok(admin_port: int) -> bool:
    conn = http.client.HTTPConnection(LOOPBACK, admin_port, timeout=1)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_ready(ready, alive, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Polls `ready()` every 5 ms; the perf_counter reading at the first success."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if ready():
            return time.perf_counter()
        if not alive():
            raise RuntimeError("exited before it was ready")
        time.sleep(POLL_S)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def tree_cpu_s(root_pid: int) -> float:
    return sum(TreeSampler(root_pid).snapshot_ticks().values()) / CLK_TCK


def roles(rss: dict[int, int], root_pid: int, workers: int) -> dict[str, int]:
    """One worker: the process itself. Several: the supervisor (root) and the fullest worker."""
    if workers == 1:
        return {"worker": rss.get(root_pid, 0)}
    children = [kib for pid, kib in rss.items() if pid != root_pid]
    return {"supervisor": rss.get(root_pid, 0), "worker": max(children, default=0),
            "total": sum(rss.values())}


def measure_process(name: str, argv: list[str], workers: int, runs: int, logs: Path,
                    readiness: str = "readyz") -> StartRow:
    """`argv` with {port}/{admin_port} filled per run; readiness "readyz" or "listen"."""
    row = StartRow(name)
    for run in range(runs):
        port, admin_port = free_port(), free_port()
        filled = [a.replace("{port}", str(port)).replace("{admin_port}", str(admin_port)) for a in argv]
        proc = ManagedProcess(name, filled, logs / f"{name}.log", env={**os.environ, **START_ENV})
        try:
            started = time.perf_counter()
            proc.start()
            probe = (lambda: readyz_ok(admin_port)) if readiness == "readyz" else (
                lambda: port_is_listening(port, timeout=0.2))
            row.ready_s.append(wait_ready(probe, proc.alive) - started)
            row.cpu_s.append(tree_cpu_s(proc.pid))
            if run == runs - 1:
                time.sleep(SETTLE_S)
                rss = tree_rss_kib(proc.pid)
                if workers > 1 and len(rss) < workers + 1:
                    raise RuntimeError(f"{len(rss)} processes, expected {workers + 1}")
                row.rss_kib = roles(rss, proc.pid, workers)
        except RuntimeError as exc:
            row.problem = f"{exc}; see {proc.log_path}"
            break
        finally:
            proc.stop()
    return row


def _docker_time(text: str) -> float:
    """An engine timestamp (RFC 3339 with nanoseconds) as epoch seconds."""
    stamp = text.strip().replace("Z", "+00:00")
    head, _, rest = stamp.partition(".")
    digits = "".join(c for c in rest if c.isdigit())
    zone = rest[len(digits):]
    return datetime.datetime.fromisoformat(f"{head}.{digits[:6] or '0'}{zone}").timestamp()


def measure_image(image: str, workers: int, runs: int, docker: list[str]) -> StartRow:
    """The image's own process start (the engine's StartedAt) and `docker run` to /readyz 200,
    host networking, loopback ports; RSS of the container's processes as the host sees them."""
    row = StartRow(f"image, {workers} worker{'s' if workers > 1 else ''}")
    env_flags = [f for k, v in START_ENV.items() for f in ("-e", f"{k}={v}")]
    for run in range(runs):
        port, admin_port = free_port(), free_port()
        name = f"sigv4proxy-start-{uuid.uuid4().hex[:8]}"
        # A tmpfs /tmp beside the read-only root: with workers, metrics are shared through files.
        argv = [*docker, "run", "-d", "--name", name, "--network", "host", "--read-only",
                "--tmpfs", "/tmp", *env_flags, image, "serve", "--listen", f"{LOOPBACK}:{port}",
                "--admin", f"{LOOPBACK}:{admin_port}", "--workers", str(workers)]
        try:
            wall = time.time()
            started = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, timeout=60)

            def alive() -> bool:
                state = subprocess.run([*docker, "inspect", "-f", "{{.State.Running}}", name],
                                       capture_output=True, text=True, timeout=30)
                return state.stdout.strip() == "true"

            ready = wait_ready(lambda: readyz_ok(admin_port), alive)
            row.run_to_ready_s.append(ready - started)
            info = subprocess.run([*docker, "inspect", "-f", "{{.State.StartedAt}} {{.State.Pid}}", name],
                                  capture_output=True, text=True, check=True, timeout=30).stdout.split()
            ready_wall = wall + (ready - started)
            row.ready_s.append(ready_wall - _docker_time(info[0]))
            row.cpu_s.append(tree_cpu_s(int(info[1])))
            if run == runs - 1:
                time.sleep(SETTLE_S)
                pid = int(info[1])
                row.rss_kib = roles(tree_rss_kib(pid), pid, workers)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            logs = subprocess.run([*docker, "logs", "--tail", "5", name], capture_output=True,
                                  text=True, timeout=30)
            row.problem = f"{exc} {logs.stderr[-300:]}".replace("\n", " ")
            break
        finally:
            subprocess.run([*docker, "rm", "-f", name], capture_output=True, timeout=60)
    return row


def markdown(rows: list[StartRow], runs: int) -> str:
    lines = ["| what | start to ready, s (median) | range | CPU to ready, s | `docker run` to ready, s "
             "| idle RSS, MiB |", "|---|---|---|---|---|---|", *(r.markdown() for r in rows)]
    return ("\n".join(lines) + f"\n\n{runs} runs each on {os.cpu_count()} CPUs; ready is /readyz "
            "200 for sigv4proxy (credentials loaded, listener up) and accepting connections for a "
            "peer; CPU is the process tree's user + system time at that moment (what a busy "
            "machine cannot stretch); RSS is read 1 s after the last run was ready.")


def sigv4proxy_command() -> list[str]:
    beside = Path(sys.executable).parent / "sigv4proxy"
    return [str(beside)] if beside.exists() else [shutil.which("sigv4proxy") or "sigv4proxy"]


def host_rows(runs: int, logs: Path, peers: list[tuple[str, str]],
              command: list[str] | None = None) -> list[StartRow]:
    serve = [*(command or sigv4proxy_command()), "serve", "--listen", f"{LOOPBACK}:{{port}}",
             "--admin", f"{LOOPBACK}:{{admin_port}}"]
    rows = [measure_process("process, 1 worker", serve, 1, runs, logs),
            measure_process("process, 2 workers", [*serve, "--workers", "2"], 2, runs, logs)]
    for name, command in peers:
        rows.append(measure_process(f"peer:{name}", ["/bin/sh", "-c", command], 1, runs, logs,
                                    readiness="listen"))
    return rows


def image_rows(image: str, runs: int, docker: list[str]) -> list[StartRow]:
    return [measure_image(image, 1, runs, docker), measure_image(image, 2, runs, docker)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", help="measure this image in containers instead of processes")
    parser.add_argument("--docker", default="docker", help="the engine's client")
    parser.add_argument("--command", help="the sigv4proxy command to measure (default: beside this "
                                          "interpreter), e.g. 'env PYTHONPATH=/old python -m sigv4proxy'")
    parser.add_argument("--peer", action="append", default=[],
                        help="another sidecar's command (shell) with {port}; ready when it accepts")
    parser.add_argument("--peer-name", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    peers = [(args.peer_name[i] if i < len(args.peer_name) else f"peer{i + 1}", command)
             for i, command in enumerate(args.peer)]
    if args.image:
        rows = image_rows(args.image, args.runs, args.docker.split())
    else:
        rows = host_rows(args.runs, out / "logs", peers, args.command.split() if args.command else None)
    table = markdown(rows, args.runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("start-image.md" if args.image else "start.md")).write_text(table + "\n")
    print(table)
    return 1 if any(r.problem for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
