"""Worker supervision: N processes share the listen and admin ports with SO_REUSEPORT.

Owns: spawning workers (each its own event loop and upstream pool), restarting a crashed one
(logged, with backoff), forwarding SIGTERM/SIGINT for a graceful drain, and the shared
prometheus multiprocess directory. Must never: leave a worker running after it exits, or import
the data plane (the supervisor stays a few MiB; prometheus-client only once a worker died).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from sigv4proxy.config import ProxyConfig

log = logging.getLogger("sigv4proxy.runtime.workers")
RESTART_BACKOFF_MAX = 10.0


def _spawn(index: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    worker_env = dict(env, SIGV4PROXY_WORKER_ID=str(index))
    # -P: `-m` would put the working directory first on sys.path, so a `sigv4proxy` directory
    # there (a source checkout) would be imported in place of the installed package: the workers
    # would run other code than the supervisor, pure Python instead of the compiled build.
    return subprocess.Popen([sys.executable, "-P", "-m", "sigv4proxy", *argv], env=worker_env)


def supervise(config: ProxyConfig, argv: list[str]) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="sigv4proxy-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    stopping = False

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = {i: _spawn(i, argv, env) for i in range(config.workers)}
    backoff = {i: 0.5 for i in workers}
    log.info("workers started", extra={"workers": config.workers, "pids": [p.pid for p in workers.values()]})
    try:
        while not stopping:
            time.sleep(0.2)
            for index, proc in list(workers.items()):
                code = proc.poll()
                if code is None or stopping:
                    continue
                from sigv4proxy.observe.metrics import mark_process_dead

                mark_process_dead(proc.pid)
                log.error("worker exited; restarting", extra={"worker": index, "pid": proc.pid, "exit_code": code})
                time.sleep(backoff[index])
                backoff[index] = min(backoff[index] * 2, RESTART_BACKOFF_MAX)
                workers[index] = _spawn(index, argv, env)
        log.info("stopping workers", extra={"drain_timeout": config.drain_timeout})
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.drain_timeout + 5
        for proc in workers.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return 0
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)
