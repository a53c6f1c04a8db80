"""`make loadtest WORKERS=2`: locust's distributed mode on loopback, bounded in time. A master and
two worker processes run the scenarios against the demo (proxy and simulator on ephemeral ports);
the master's merged report must count exactly what the proxy itself counted (its own metrics, an
oracle outside locust), so stats lost from either worker would show. Also: the cluster manifest
runs the same file as a master and as many workers as it expects."""

from __future__ import annotations

import csv
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from support.polling import eventually_sync

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "loadtests" / "locustfile.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError:
        return 0, ""
    finally:
        conn.close()


def proxied_requests(admin: int) -> int:
    """Requests the proxy answered, from its own /metrics."""
    _, text = get(admin, "/metrics")
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("sigv4proxy_request_duration_seconds_count")))


def test_master_and_two_workers_merge_into_one_report(tmp_path):
    port, admin, sim = free_port(), free_port(), free_port()
    demo = subprocess.Popen([str(Path(sys.executable).parent / "sigv4proxy"), "demo", "--listen",
                             f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--sim-listen",
                             f"127.0.0.1:{sim}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert eventually_sync(lambda: get(admin, "/readyz")[0] == 200, timeout=30), "demo ready"
        run = subprocess.run([sys.executable, str(RUNNER), "--target", f"http://127.0.0.1:{port}",
                              "--workers", "2", "--users", "4", "--spawn-rate", "4", "--run-time", "5s",
                              "--out", str(tmp_path)], capture_output=True, text=True, timeout=150,
                             env={k: v for k, v in os.environ.items() if not k.startswith("SIGV4PROXY_")})
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-3000:]
        assert "2 workers connected" in log and "to 2 ready workers" in log, log[-3000:]
        with (tmp_path / "sigv4proxy_stats.csv").open() as fh:
            rows = {row["Name"]: row for row in csv.DictReader(fh)}
        total = rows["Aggregated"]
        reported = int(total["Request Count"])
        assert reported > 0 and int(total["Failure Count"]) == 0
        assert sum(int(r["Request Count"]) for name, r in rows.items() if name != "Aggregated") == reported
        # Every request locust reported reached the proxy, and nothing else did.
        assert eventually_sync(lambda: proxied_requests(admin) == reported, timeout=5), (
            proxied_requests(admin), reported)
        assert (tmp_path / "report.html").stat().st_size > 0
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=5)


def _manifest() -> dict[str, dict]:
    with (ROOT / "config" / "loadtest" / "locust.yaml").open() as fh:
        return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(fh) if d}


def _container(doc: dict, name: str) -> dict:
    pod = doc["spec"]["template"]["spec"]
    (container,) = [c for c in pod.get("containers", []) + pod.get("initContainers", []) if c["name"] == name]
    return container


def test_cluster_manifest_runs_master_and_the_workers_it_expects():
    docs = _manifest()
    master = _container(docs["Job/locust-master"], "locust")
    workers = docs["Deployment/locust-worker"]
    worker = _container(workers, "locust")
    expect = int(master["args"][master["args"].index("--expect-workers") + 1])
    assert workers["spec"]["replicas"] == expect
    assert "--master" in master["args"] and "--headless" in master["args"]
    assert "--run-time" in master["args"]  # a cluster run ends by itself too
    assert "--worker" in worker["args"]
    service = docs["Service/locust-master"]
    host = worker["args"][worker["args"].index("--master-host") + 1]
    assert host == service["metadata"]["name"]
    assert 5557 in {p["port"] for p in service["spec"]["ports"]}
    # Both run the repository's locustfile, mounted from the ConfigMap made of it.
    for container, doc in ((master, docs["Job/locust-master"]), (worker, workers)):
        assert container["args"][container["args"].index("-f") + 1] == "/locust/locustfile.py"
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/locust"]
        assert volumes[mount["name"]]["configMap"]["name"] == "sigv4proxy-locustfile"
    # Workers send through their own sidecar to the Lattice service, as the apps do.
    sidecar = _container(workers, "sigv4proxy")
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["SIGV4PROXY_TARGET"] == "http://127.0.0.1:8080"
    assert env["SIGV4PROXY_HOST_HEADER"].endswith(".on.aws") and ".vpc-lattice-svcs." in env["SIGV4PROXY_HOST_HEADER"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["args"][0] == "serve"
