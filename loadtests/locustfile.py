"""Locust scenarios for the sigv4proxy sidecar, plus `make loadtest`'s bounded headless runner.

Owns: the pre-rollout load scenarios (steady mixed GET/POST, 1 MiB uploads, an opt-in ramp shape)
and the runner that points them at a target, starting the local demo when nothing listens there.
It must never be collected by pytest (hence not `test_*`), never run unbounded (every run has a
time limit, the ramp ends by itself) and never leave the demo running.

Locust (any options):   locust -f loadtests/locustfile.py --host http://127.0.0.1:8080
Bounded headless run:   python loadtests/locustfile.py [--ramp] [--users 20] [--run-time 30s]
Distributed (locust's master and N worker processes on this machine; the master merges their
stats into one report):  python loadtests/locustfile.py --workers N ...
For a cluster, config/loadtest/locust.yaml runs the same file as a master and worker pods.

Environment:
  SIGV4PROXY_TARGET       base URL (default http://127.0.0.1:8080, `make run`'s demo proxy)
  SIGV4PROXY_PATH         request path (default /hello)
  SIGV4PROXY_HOST_HEADER  Host to send, e.g. your Lattice service's host (default: the URL's)
  SIGV4PROXY_SHAPE=ramp   use RampShape instead of fixed users (the runner's --ramp sets it)
  SIGV4PROXY_RAMP_PEAK, SIGV4PROXY_RAMP_SECONDS   the ramp's peak users (50) and length (60 s)
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, task

DEFAULT_TARGET = "http://127.0.0.1:8080"
DEMO_READYZ = "http://127.0.0.1:9901/readyz"
TARGET = os.environ.get("SIGV4PROXY_TARGET", DEFAULT_TARGET)
REQUEST_PATH = os.environ.get("SIGV4PROXY_PATH", "/hello")
HOST_HEADER = os.environ.get("SIGV4PROXY_HOST_HEADER", "")
SHAPE = os.environ.get("SIGV4PROXY_SHAPE", "")

SMALL_BODY = bytes(range(256)) * 16  # 4 KiB
LARGE_BODY = bytes(range(256)) * 4096  # 1 MiB
HEADERS = {"Content-Type": "application/octet-stream", **({"Host": HOST_HEADER} if HOST_HEADER else {})}


def check_2xx(response) -> None:
    """Only 2xx counts as success (locust alone would accept a 3xx from a misrouted proxy)."""
    if not 200 <= response.status_code < 300:
        response.failure(f"HTTP {response.status_code}")


class SteadyMixedUser(FastHttpUser):
    """Steady traffic: mostly GETs with some 4 KiB POSTs, short think time."""

    host = TARGET
    weight = 9
    wait_time = between(0.01, 0.05)

    @task(4)
    def get(self) -> None:
        with self.client.get(REQUEST_PATH, headers=HEADERS, name=f"GET {REQUEST_PATH}",
                             catch_response=True) as response:
            check_2xx(response)

    @task(1)
    def post_small(self) -> None:
        with self.client.post(REQUEST_PATH, data=SMALL_BODY, headers=HEADERS,
                              name=f"POST 4KiB {REQUEST_PATH}", catch_response=True) as response:
            check_2xx(response)


class LargeUploadUser(FastHttpUser):
    """Large uploads: 1 MiB POST bodies streamed through the proxy (Lattice's payloads are
    UNSIGNED-PAYLOAD, so the proxy must stream without buffering or hashing)."""

    host = TARGET
    weight = 1
    wait_time = between(0.1, 0.3)

    @task
    def upload(self) -> None:
        with self.client.post(REQUEST_PATH, data=LARGE_BODY, headers=HEADERS,
                              name=f"POST 1MiB {REQUEST_PATH}", catch_response=True) as response:
            check_2xx(response)


class RampShape(LoadTestShape):
    """Ramp up to the peak over 40% of the run, hold 40%, ramp down 20%, then stop.

    Selected only with SIGV4PROXY_SHAPE=ramp (locust uses any non-abstract shape it finds).
    """

    abstract = SHAPE != "ramp"
    peak_users = int(os.environ.get("SIGV4PROXY_RAMP_PEAK", "50"))
    total_seconds = float(os.environ.get("SIGV4PROXY_RAMP_SECONDS", "60"))

    def users_at(self, t: float) -> int | None:
        """Target user count at `t` seconds into the run; None once the run is over."""
        up, hold = 0.4 * self.total_seconds, 0.8 * self.total_seconds
        if t >= self.total_seconds:
            return None
        if t < up:
            return max(1, math.ceil(self.peak_users * t / up))
        if t < hold:
            return self.peak_users
        return max(1, math.ceil(self.peak_users * (self.total_seconds - t) / (self.total_seconds - hold)))

    def tick(self) -> tuple[int, float] | None:
        users = self.users_at(self.get_run_time())
        if users is None:
            return None
        spawn_rate = max(1.0, self.peak_users / max(1.0, 0.4 * self.total_seconds) * 2)
        return users, spawn_rate


# ---- the bounded headless runner (`make loadtest`) ----------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def is_listening(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def demo_ready() -> bool:
    try:
        with urllib.request.urlopen(DEMO_READYZ, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, first: signal.Signals = signal.SIGTERM) -> None:
    """Signal the child's whole process group; SIGKILL it if it does not exit in time."""
    for sig, wait_s in ((first, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def start_demo(bin_dir: Path, log_path: Path) -> subprocess.Popen:
    sigv4proxy = str(bin_dir / "sigv4proxy") if (bin_dir / "sigv4proxy").exists() else "sigv4proxy"
    probe = subprocess.run([sigv4proxy, "demo", "--help"], capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        raise SystemExit("loadtest: nothing listens on the target and `sigv4proxy demo` does not "
                         "exist yet: start a proxy yourself or set SIGV4PROXY_TARGET")
    log = open(log_path, "wb")
    proc = subprocess.Popen([sigv4proxy, "demo"], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loadtest: `sigv4proxy demo` exited early (see {log_path})")
        if demo_ready():
            return proc
        time.sleep(0.2)
    stop_group(proc)
    raise SystemExit(f"loadtest: the demo was not ready on {DEMO_READYZ} within 30 s (see {log_path})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_argv(locust: list[str], workers: int) -> tuple[list[str], list[list[str]]]:
    """(master's extra flags, each worker's command) for locust's distributed mode on loopback:
    the master waits for every worker (30 s at most), spreads the users over them and merges
    their stats into its reports; workers quit when the master ends the run."""
    port = free_port()
    master = ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
              "--expect-workers", str(workers), "--expect-workers-max-wait", "30"]
    worker = [*locust[:3], "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
    return master, [worker] * workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bounded headless locust run against the sidecar")
    parser.add_argument("--target", default=TARGET, help="base URL (env SIGV4PROXY_TARGET)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--run-time", default="30s", help="locust duration, e.g. 30s, 2m")
    parser.add_argument("--ramp", action="store_true", help="use RampShape (its own duration)")
    parser.add_argument("--workers", type=int, default=0,
                        help="locust worker processes under a master (0: one process, no master)")
    parser.add_argument("--out", default=str(ROOT / "loadtest-results"))
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, SIGV4PROXY_TARGET=args.target)
    if args.ramp:
        env["SIGV4PROXY_SHAPE"] = "ramp"
    bound_s = float(env.get("SIGV4PROXY_RAMP_SECONDS", "60")) if args.ramp else parse_seconds(args.run_time)
    demo = None
    if not is_listening(args.target):
        if args.target.rstrip("/") != DEFAULT_TARGET:
            print(f"loadtest: nothing listens on {args.target}", file=sys.stderr)
            return 2
        print("loadtest: nothing on 127.0.0.1:8080; starting `sigv4proxy demo`", file=sys.stderr)
        demo = start_demo(bin_dir, out / "demo.log")
    locust = [str(bin_dir / "locust") if (bin_dir / "locust").exists() else "locust",
              "-f", str(Path(__file__).resolve()), "--headless", "--host", args.target,
              "--csv", str(out / "sigv4proxy"), "--html", str(out / "report.html"),
              "--only-summary", "--stop-timeout", "5"]
    if not args.ramp:
        locust += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time]
    master_flags, worker_argvs = distributed_argv(locust, args.workers) if args.workers > 0 else ([], [])
    proc = subprocess.Popen(locust + master_flags + extra, env=env, start_new_session=True)
    workers = [subprocess.Popen(w, env=env, start_new_session=True) for w in worker_argvs]
    try:
        return proc.wait(timeout=bound_s + 60 + (30 if workers else 0))
    except subprocess.TimeoutExpired:
        print("loadtest: locust overran its time bound and was stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGINT)  # SIGINT: locust still writes its reports
        for worker in workers:  # they quit when the master does; any left are stopped
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_group(worker)
        if demo is not None:
            stop_group(demo)
        print(f"loadtest: reports in {out}/ (sigv4proxy_*.csv, report.html)", file=sys.stderr)


def parse_seconds(text: str) -> float:
    """Locust's duration syntax ('30s', '2m', '1h30m', '45') in seconds."""
    total, number = 0.0, ""
    for char in text.strip():
        if char.isdigit() or char == ".":
            number += char
        elif char in "hms" and number:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
        else:
            raise ValueError(f"bad duration: {text!r}")
    return total + (float(number) if number else 0.0)


if __name__ == "__main__":
    sys.exit(main())
