"""`sigv4proxy sim` as a separate process, for tests where the simulator's timing must not share the
proxy's event loop (a connection closed at Lattice's idle limit races a request only between
processes) or where it must run inside a network namespace.

Owns: starting it with the given flags, waiting for its banner (the port it listens on), stopping it
by its PID and reading back what it reports at exit: the connections it closed at its limits, and
its access-log records. Must never: leave the process running (`with` stops it, killing it if
SIGTERM is not enough).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


class SimProcess:
    def __init__(self, proc: subprocess.Popen, log: pathlib.Path, access_log: pathlib.Path) -> None:
        self.proc = proc
        self.log = log
        self.access_log = access_log
        self.port = 0

    def wait_listening(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            match = re.search(r"listening on https?://\S+:(\d+) ", text)
            if match:
                self.port = int(match.group(1))
                return self.port
            assert self.proc.poll() is None, f"sim exited with {self.proc.returncode}: {text[-2000:]}"
            assert time.monotonic() < deadline, f"sim not listening in {START_TIMEOUT_S}s: {text[-2000:]}"
            time.sleep(0.05)

    def stop(self) -> dict[str, dict[str, int]]:
        """Stops it (SIGTERM) and returns its closes at its limits: {protocol: {reason: count}}."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        text = self.log.read_text(errors="replace")
        match = re.search(r"connections closed at its limits: (\{.*\})", text)
        assert match, f"sim did not report its closes (exit {self.proc.returncode}): {text[-2000:]}"
        return json.loads(match.group(1))

    def records(self) -> list[dict]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def sim_process(directory: pathlib.Path, *flags: str, name: str = "sim",
                popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> Iterator[SimProcess]:
    """A listening simulator (`flags` must include --identities and --listen); stopped on exit.
    `popen` starts the argv, e.g. `functools.partial(popen_in_netns, ns)` inside a namespace."""
    log, access_log = directory / f"{name}.log", directory / f"{name}.access.jsonl"
    argv = [sys.executable, "-m", "sigv4proxy", "sim", "--access-log", str(access_log), *flags]
    with open(log, "wb") as sink:
        proc = popen(argv, stdout=subprocess.DEVNULL, stderr=sink)
    sim = SimProcess(proc, log, access_log)
    try:
        sim.wait_listening()
        yield sim
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
