"""Tests for the `make bench` harness and the locust scenarios (no load generation here).

Parsers run on wrk/h2load output and /proc text captured on this machine (tests/data/bench/); the
process, port and upstream parts run for real on loopback; the locustfile is imported in a
subprocess because importing locust monkey-patches the interpreter (gevent).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "bench"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_parse  # noqa: E402
from bench_parse import ParseError, ProcStat  # noqa: E402
from bench_procs import (HarnessError, ManagedProcess, TreeSampler, free_port,  # noqa: E402
                         group_has_live_members, port_is_free, port_is_listening, run_bounded,
                         wait_until)
from bench_report import (Row, compute_ratios, floor_table, markdown_table,  # noqa: E402
                          peer_comparisons, peer_table, summary_table)


def fixture(name: str) -> str:
    return (DATA / name).read_text()


# ---- wrk ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, micros",
    [("653.00us", 653.0), ("1.48ms", 1480.0), ("1.30s", 1_300_000.0), ("2.00m", 120_000_000.0),
     ("  201.00us ", 201.0)],
)
def test_wrk_duration_units(text, micros):
    assert bench_parse.duration_to_us(text) == pytest.approx(micros)


@pytest.mark.parametrize("text", ["", "12", "1.0 parsecs", "-nan%"])
def test_wrk_duration_rejects_garbage(text):
    with pytest.raises(ParseError):
        bench_parse.duration_to_us(text)


def test_wrk_clean_get_run():
    result = bench_parse.parse_wrk(fixture("wrk_get_c32.txt"))
    assert result.requests == 351238
    assert result.rps == pytest.approx(117054.09)
    assert result.duration_s == pytest.approx(3.00)
    assert result.p50_us == pytest.approx(201.0)
    assert result.p99_us == pytest.approx(653.0)
    assert (result.non_2xx, result.socket_errors) == (0, 0)
    assert result.valid


def test_wrk_mixed_units_in_latency_distribution():
    result = bench_parse.parse_wrk(fixture("wrk_post4k_c32.txt"))
    assert result.p50_us == pytest.approx(420.0)  # "420.00us"
    assert result.p99_us == pytest.approx(1480.0)  # "1.48ms"
    assert result.requests == 205612 and result.valid


def test_wrk_non_2xx_makes_the_run_invalid():
    result = bench_parse.parse_wrk(fixture("wrk_404_socket_errors.txt"))
    assert result.non_2xx == 3703 and result.requests == 3703
    assert result.p99_us == pytest.approx(38_960.0)
    assert not result.valid


def test_wrk_latency_in_seconds_and_503s():
    result = bench_parse.parse_wrk(fixture("wrk_503_seconds.txt"))
    assert result.p50_us == pytest.approx(1_300_000.0)
    assert result.duration_s == pytest.approx(4.01)
    assert result.non_2xx == 12 and not result.valid


def test_wrk_socket_timeouts_are_errors():
    result = bench_parse.parse_wrk(fixture("wrk_timeouts.txt"))
    assert result.socket_errors == 8
    assert result.non_2xx == 8
    assert not result.valid


def test_wrk_that_could_not_connect_is_a_parse_error():
    with pytest.raises(ParseError, match="Connection refused"):
        bench_parse.parse_wrk(fixture("wrk_connect_refused.txt"))


def test_wrk_without_latency_flag_is_rejected():
    text = "\n".join(l for l in fixture("wrk_get_c32.txt").splitlines() if "%" not in l or "Stdev" in l)
    with pytest.raises(ParseError, match="--latency"):
        bench_parse.parse_wrk(text)


# ---- h2load -------------------------------------------------------------------------------------


def test_h2load_summary_and_percentiles_from_its_log():
    lines = fixture("h2load_log_head.tsv").splitlines()
    result = bench_parse.parse_h2load(fixture("h2load_get_c4.txt"), lines)
    durations = sorted(float(line.split("\t")[2]) for line in lines)
    # Nearest rank, computed here independently of the harness.
    assert result.p50_us == durations[math.ceil(0.50 * len(durations)) - 1]
    assert result.p99_us == durations[math.ceil(0.99 * len(durations)) - 1]
    assert result.requests == 101568
    assert result.rps == pytest.approx(50784.0)
    assert result.valid


def test_h2load_percentiles_on_known_values():
    lines = [f"{1000 + i}\t200\t{i}" for i in range(100, 0, -1)]  # durations 1..100, unsorted
    result = bench_parse.parse_h2load(fixture("h2load_get_c4.txt"), lines)
    assert (result.p50_us, result.p99_us) == (50.0, 99.0)


def test_h2load_non_2xx_and_failures_are_counted():
    text = fixture("h2load_get_c4.txt")
    text = text.replace("101568 succeeded, 0 failed, 0 errored, 0 timeout",
                        "101560 succeeded, 8 failed, 3 errored, 5 timeout")
    text = text.replace("status codes: 101568 2xx, 0 3xx, 0 4xx, 0 5xx",
                        "status codes: 101468 2xx, 0 3xx, 0 4xx, 100 5xx")
    result = bench_parse.parse_h2load(text, ["1\t200\t10"])
    assert result.non_2xx == 100
    assert result.socket_errors == 8
    assert not result.valid


def test_h2load_without_summary_is_a_parse_error():
    with pytest.raises(ParseError):
        bench_parse.parse_h2load("connect to 127.0.0.1:1 failed: Connection refused\n", [])


# ---- /proc accounting ---------------------------------------------------------------------------


def test_proc_stat_of_a_busy_process():
    stat = bench_parse.parse_proc_stat(fixture("proc_stat_busy_python.txt"))
    assert stat == ProcStat(pid=19869, ppid=19867, pgrp=19867, cpu_ticks=61 + 1, state="R")


def test_proc_stat_with_spaces_and_parens_in_the_name():
    line = fixture("proc_stat_busy_python.txt").replace("(python3)", "(my (odd) name)")
    stat = bench_parse.parse_proc_stat(line)
    assert (stat.pid, stat.ppid, stat.pgrp, stat.cpu_ticks) == (19869, 19867, 19867, 62)


def test_proc_status_memory():
    assert bench_parse.parse_proc_status_memory(fixture("proc_status_python.txt")) == (44256, 44256)
    assert bench_parse.parse_proc_status_memory("Name:\tkthreadd\nState:\tS\n") == (0, 0)


def test_tree_members_follow_group_and_parentage():
    stats = [
        ProcStat(100, 1, 100, 0),  # root
        ProcStat(101, 100, 100, 0),  # worker
        ProcStat(102, 101, 102, 0),  # grandchild in its own session
        ProcStat(103, 1, 100, 0),  # orphaned worker, still in the group
        ProcStat(200, 1, 200, 0),  # unrelated
        ProcStat(201, 200, 200, 0),
    ]
    assert bench_parse.tree_members(stats, 100) == {100, 101, 102, 103}


def test_cpu_and_rss_accounting():
    before = {1: 100, 2: 50}
    after = {1: 160, 2: 90, 3: 20}  # pid 3 was born during the run: all its ticks count
    assert bench_parse.cpu_seconds_between(before, after, 100) == pytest.approx(1.2)
    assert bench_parse.cpu_us_per_request(1.2, 4000) == pytest.approx(300.0)
    assert bench_parse.cpu_us_per_request(1.2, 0) is None
    samples = [{1: (1000, 1200), 2: (500, 500)}, {1: (1100, 1200), 2: (800, 800), 3: (50, 60)}]
    assert bench_parse.peak_rss_kib(samples) == 1200 + 800 + 60
    assert bench_parse.largest_process_rss_kib(samples) == 1200  # pid 1's VmHWM beats its VmRSS
    assert bench_parse.largest_process_rss_kib([]) == 0


def test_tree_sampler_measures_a_real_worker():
    """A parent forks a child that burns ~0.4 s of CPU and holds 40 MiB: both are in the tree."""
    code = textwrap.dedent("""
        import os, sys, time
        sys.stdout.write("go\\n"); sys.stdout.flush()
        if os.fork() == 0:
            block = bytearray(40 << 20)
            for i in range(0, len(block), 4096): block[i] = 1
            end = time.process_time() + 0.4
            while time.process_time() < end: pass
            time.sleep(5); os._exit(0)
        time.sleep(5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == b"go\n"
        with TreeSampler(proc.pid, interval_s=0.05) as sampler:
            time.sleep(1.2)
        assert len(sampler.last_ticks) == 2
        assert 0.3 <= sampler.cpu_seconds() <= 1.3
        assert sampler.peak_rss_kib() > 40 * 1024
        # the child alone holds the 40 MiB: the largest process is less than the tree's sum
        assert 40 * 1024 < sampler.largest_process_rss_kib() < sampler.peak_rss_kib()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def test_tree_sampler_peak_is_per_case_not_since_process_start():
    """80 MiB touched and freed before the case starts must not count as the case's peak."""
    code = textwrap.dedent("""
        import sys, time
        block = bytearray(80 << 20)
        for i in range(0, len(block), 4096): block[i] = 1
        del block
        sys.stdout.write("go\\n"); sys.stdout.flush()
        time.sleep(5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == b"go\n"
        hwm_before = bench_parse.parse_proc_status_memory(Path(f"/proc/{proc.pid}/status").read_text())[1]
        assert hwm_before > 80 * 1024
        with TreeSampler(proc.pid, interval_s=0.05) as sampler:
            time.sleep(0.3)
        assert 0 < sampler.peak_rss_kib() < 40 * 1024
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# ---- processes and ports ------------------------------------------------------------------------


def test_run_bounded_kills_an_overstaying_tool():
    start = time.monotonic()
    with pytest.raises(HarnessError, match="killed"):
        run_bounded(["sleep", "30"], timeout_s=0.5)
    assert time.monotonic() - start < 10


def test_managed_process_stops_its_whole_group_even_if_it_ignores_sigterm(tmp_path):
    script = "trap '' TERM; sleep 60 & sleep 60 & wait"
    proc = ManagedProcess("stubborn", ["sh", "-c", script], tmp_path / "log").start()
    time.sleep(0.3)
    assert group_has_live_members(proc.pid)
    proc.stop(grace_s=0.5)
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while group_has_live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_has_live_members(proc.pid)  # zombies awaiting init at most
    proc.stop()  # idempotent


def test_port_checks_and_early_exit_detection(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert not port_is_free(held.getsockname()[1])
    assert port_is_free(free_port())
    dead = ManagedProcess("dies", ["sh", "-c", "echo boom; exit 3"], tmp_path / "log").start()
    with pytest.raises(HarnessError, match="boom"):
        wait_until(lambda: False, dead, 10, "dies")
    dead.stop()


# ---- the fallback upstream over real sockets ----------------------------------------------------


@pytest.fixture
def fallback_upstream(tmp_path):
    h1, h2c = free_port(), free_port()
    proc = ManagedProcess("fallback", [sys.executable, str(ROOT / "benchmarks" / "upstream_fallback.py"),
                                       "--h1-port", str(h1), "--h2c-port", str(h2c), "--body-bytes", "64"],
                          tmp_path / "log").start()
    try:
        wait_until(lambda: not port_is_free(h2c) and not port_is_free(h1), proc, 20, "fallback")
        yield h1, h2c
    finally:
        proc.stop()


def test_fallback_http1_keepalive_with_bodies(fallback_upstream):
    h1, _ = fallback_upstream
    conn = http.client.HTTPConnection("127.0.0.1", h1, timeout=10)
    try:
        for method, body, chunked in [("GET", None, False), ("POST", b"a" * (1 << 20), False),
                                      ("POST", iter([b"x" * 5000, b"y" * 3]), True),
                                      ("GET", None, False)]:
            headers = {"Transfer-Encoding": "chunked"} if chunked else {}
            conn.request(method, "/hello", body=body, headers=headers, encode_chunked=chunked)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"x" * 64)
    finally:
        conn.close()


def test_fallback_h2c_reads_a_1mib_upload(fallback_upstream):
    _, h2c = fallback_upstream
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", h2c), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":path", "/hello"), (":scheme", "http"),
                                (":authority", "127.0.0.1")])
        body, status, received, ended = memoryview(b"z" * (1 << 20)), None, b"", False
        deadline = time.monotonic() + 20
        while not ended and time.monotonic() < deadline:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if body and window > 0:
                conn.send_data(sid, bytes(body[:window]), end_stream=len(body) <= window)
                body = body[window:]
            sock.sendall(conn.data_to_send())
            if body and conn.local_flow_control_window(sid) > 0:
                continue
            data = sock.recv(65536)
            assert data, "server closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    pytest.fail(f"stream reset: {event.error_code}")
            sock.sendall(conn.data_to_send())
        assert ended and not body
        assert (status, received) == (b"200", b"x" * 64)


def test_nginx_config_listens_on_loopback_only(tmp_path):
    from bench_upstream import render_nginx_conf

    text = render_nginx_conf(tmp_path, 41001, 41002, "x" * 64, 1)
    listens = [line.split()[1] for line in text.splitlines() if line.strip().startswith("listen")]
    assert listens == ["127.0.0.1:41001;", "127.0.0.1:41002"]  # no TLS listener unless asked
    assert f"pid {tmp_path}/nginx.pid;" in text and "js_content bench.reply;" in text


# ---- report -------------------------------------------------------------------------------------


def test_table_flags_errors_and_computes_ratios():
    rows = [
        Row("direct-h1", "GET c32", "wrk", None, requests=10000, rps=1000.0, p50_us=100,
            p99_us=400, cpu_us_per_req=10.0, peak_rss_kib=2048),
        Row("proxy-w1-h1", "GET c32", "wrk", "direct-h1", requests=5000, rps=500.0, p50_us=300,
            p99_us=1000, cpu_us_per_req=120.0, peak_rss_kib=8192, largest_process_rss_kib=6144),
        Row("proxy-w2-h1", "GET c32", "wrk", "direct-h1", requests=90000, rps=90000.0, p50_us=1,
            p99_us=2, non_2xx=7),
        Row("peer:go", "GET c32", "wrk", "direct-h1", problem="preflight GET: HTTP 403"),
    ]
    compute_ratios(rows)
    assert rows[1].ratios == {"rps": 0.5, "p99_us": 2.5, "cpu_us_per_req": 12.0, "peak_rss_kib": 4.0}
    assert rows[2].ratios == {} and rows[3].ratios == {}
    table = markdown_table(rows).splitlines()
    assert len({line.count("|") for line in table}) == 1  # every line has the same columns
    assert "| proxy-w1-h1 | GET c32 | 500 | ×0.50 | 0.30 | 1.00 | ×2.50 | 120 | ×12.00 | 8.0 | ×4.00 | 6.0 | ok |" in table
    flagged = next(line for line in table if line.startswith("| proxy-w2-h1"))
    assert "90,000" not in flagged and "FLAGGED: 7 non-2xx" in flagged
    assert "FLAGGED: preflight GET: HTTP 403" in table[-1]


def test_ratios_are_withheld_when_the_baseline_failed():
    rows = [Row("direct-h1", "GET c1", "wrk", None, requests=10, rps=10.0, socket_errors=1),
            Row("proxy-w1-h1", "GET c1", "wrk", "direct-h1", requests=10, rps=5.0)]
    compute_ratios(rows)
    assert rows[1].ratios == {}
    assert "| proxy-w1-h1 | GET c1 | 5 | — |" in markdown_table(rows)


def test_peer_table_divides_each_proxy_row_by_the_peer_in_the_same_case():
    rows = [
        Row("direct-h1", "GET c128", "wrk", None, requests=9, rps=80000.0, p99_us=5000),
        Row("proxy-w2-h1", "GET c128", "wrk", "direct-h1", requests=9, rps=12000.0, p99_us=20000,
            cpu_us_per_req=110.0, peak_rss_kib=100),
        Row("proxy-w2-h2tls", "GET c128", "wrk", "direct-h1", requests=9, rps=9000.0, p99_us=40000),
        Row("proxy-w2-h1", "POST 1MiB c128", "wrk", "direct-h1", requests=9, rps=900.0,
            p99_us=300000),
        Row("peer:go", "GET c128", "wrk", "direct-h1", requests=9, rps=6000.0, p99_us=50000,
            cpu_us_per_req=220.0, peak_rss_kib=400),
        Row("peer:go", "POST 1MiB c128", "wrk", "direct-h1", requests=9, rps=450.0, p99_us=1,
            non_2xx=3),  # a failed peer run is no yardstick
    ]
    comparisons = peer_comparisons(rows)
    assert comparisons == [
        {"peer": "peer:go", "target": "proxy-w2-h1", "case": "GET c128", "rps": 2.0,
         "p99_us": 0.4, "cpu_us_per_req": 0.5, "peak_rss_kib": 0.25},
        {"peer": "peer:go", "target": "proxy-w2-h2tls", "case": "GET c128", "rps": 1.5,
         "p99_us": 0.8, "cpu_us_per_req": None, "peak_rss_kib": None},
    ]
    table = peer_table(rows).splitlines()
    assert table[2] == "| case | proxy-w2-h1 | proxy-w2-h2tls |"
    assert table[4] == "| GET c128 | RPS ×2.00, p99 ×0.40 | RPS ×1.50, p99 ×0.80 |"
    assert not any("1MiB" in line for line in table)
    assert peer_table(rows[:4]) == ""  # no peer ran: nothing to add



def test_the_go_tls_peer_is_a_yardstick_for_ours_over_tls_only():
    rows = [
        Row("proxy-w2-h1", "GET c128", "wrk", "direct-h1", requests=9, rps=12000.0, p99_us=20000),
        Row("proxy-w2-h2tls", "GET c128", "wrk", "direct-h1", requests=9, rps=9000.0, p99_us=40000),
        Row("peer:go-pooled", "GET c128", "wrk", "direct-h1", requests=9, rps=6000.0, p99_us=50000),
        Row("peer:go-pooled-tls", "GET c128", "wrk", "direct-h1", requests=9, rps=7500.0,
            p99_us=20000),
    ]
    pairs = [(c["peer"], c["target"], c["rps"]) for c in peer_comparisons(rows)]
    assert pairs == [("peer:go-pooled", "proxy-w2-h1", 2.0), ("peer:go-pooled", "proxy-w2-h2tls", 1.5),
                     ("peer:go-pooled-tls", "proxy-w2-h2tls", 1.2)]
    table = peer_table(rows)
    assert ("Against `peer:go-pooled-tls` (same run; RPS and p99 as multiples of the peer's):\n\n"
            "| case | proxy-w2-h2tls |\n|---|---|\n| GET c128 | RPS ×1.20, p99 ×2.00 |") in table

# ---- locustfile ---------------------------------------------------------------------------------

LOCUST_PROBE = textwrap.dedent("""
    import json, sys
    from locust.util.load_locustfile import load_locustfile
    users, shapes = load_locustfile(sys.argv[1])
    import locustfile as lf
    shape = lf.RampShape()
    timeline = [shape.users_at(t / 2) for t in range(0, 2 * int(shape.total_seconds) + 2)]
    print(json.dumps({
        "users": {name: {"weight": cls.weight, "tasks": len(cls.tasks), "host": cls.host}
                  for name, cls in users.items()},
        "shapes": [type(s).__name__ for s in shapes],
        "timeline": timeline,
        "path": lf.REQUEST_PATH,
    }))
""")


def load_locustfile_in_subprocess(**env: str) -> dict:
    path = ROOT / "loadtests" / "locustfile.py"
    out = subprocess.run([sys.executable, "-c", LOCUST_PROBE, str(path)], capture_output=True,
                         timeout=60, cwd=path.parent,
                         env={**os.environ, "PYTHONPATH": str(path.parent), **env}, check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def test_locustfile_scenarios_default_to_the_demo():
    info = load_locustfile_in_subprocess()
    assert info["users"] == {
        "SteadyMixedUser": {"weight": 9, "tasks": 5, "host": "http://127.0.0.1:8080"},
        "LargeUploadUser": {"weight": 1, "tasks": 1, "host": "http://127.0.0.1:8080"},
    }
    assert info["path"] == "/hello"
    assert info["shapes"] == []  # the ramp is opt-in


def test_locustfile_ramp_shape_selected_by_env_and_bounded():
    info = load_locustfile_in_subprocess(SIGV4PROXY_SHAPE="ramp", SIGV4PROXY_RAMP_PEAK="8",
                                         SIGV4PROXY_RAMP_SECONDS="10",
                                         SIGV4PROXY_TARGET="http://127.0.0.1:9")
    assert info["shapes"] == ["RampShape"]
    assert info["users"]["SteadyMixedUser"]["host"] == "http://127.0.0.1:9"
    timeline = info["timeline"]  # every 0.5 s from 0 to 10.5 s
    running = [u for u in timeline if u is not None]
    assert max(running) == 8 and min(running) >= 1
    assert running[:8] == sorted(running[:8])  # ramps up first
    assert timeline[-2:] == [None, None]  # ends by itself


def test_cases_run_across_all_targets_in_turn_and_rows_come_back_by_target(monkeypatch, tmp_path):
    """Case-major order, so a slow minute of a shared machine hits every target alike; the table
    still lists rows target by target. A target that cannot run is flagged, not run."""
    import bench
    from bench_upstream import Upstream

    args = bench.parse_args(["--quick", "--out", str(tmp_path)])
    runner = bench.Bench(args, tmp_path)
    upstream = Upstream("nginx", 41001, 41002, process=type("P", (), {"pid": 4242})())
    targets = [bench.Target("direct-h1", "wrk", None, upstream_port=41001),
               bench.Target("proxy-w1-h1", "wrk", "direct-h1", upstream_port=41001),
               bench.Target("peer:absent", "wrk", "direct-h1", skip_reason="not installed"),
               bench.Target("peer:go", "wrk", "direct-h1", upstream_port=41001)]
    monkeypatch.setattr(bench, "preflight", lambda port, files, cases: "")
    ran = []

    def fake_run_case(target, case, port, root_pid):
        assert (port, root_pid) == (41001, 4242)
        ran.append((target.name, case.label))
        return Row(target.name, case.label, "wrk", target.baseline, requests=1, rps=1.0)

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    runner.run_targets(targets, upstream)
    assert ran == [(t, c.label) for c in runner.cases for t in ("direct-h1", "proxy-w1-h1", "peer:go")]
    assert [(r.target, r.case) for r in runner.rows] == [
        (t.name, c.label) for t in targets for c in runner.cases]
    assert {r.problem for r in runner.rows if r.target == "peer:absent"} == {"skipped: not installed"}


def test_peer_command_placeholders_leave_other_braces_alone():
    from bench import fill_placeholders
    from bench_upstream import Upstream

    upstream = Upstream("nginx", 41001, 41002, process=None,  # type: ignore[arg-type]
                        h2tls_port=41003, ca_file="/tmp/ca.pem")
    argv = ["/bin/sh", "-c", "SSL_CERT_FILE={ca_file} proxy -p {port} -a {admin_port} "
            "-u {upstream} -2 {upstream_h2c} -t {upstream_host}:{upstream_h2tls_port} "
            "--json '{\"a\": {}}'"]
    assert fill_placeholders(argv, 5000, 5001, upstream)[2] == (
        "SSL_CERT_FILE=/tmp/ca.pem proxy -p 5000 -a 5001 -u http://127.0.0.1:41001 "
        "-2 http://127.0.0.1:41002 -t 127.0.0.1:41003 --json '{\"a\": {}}'")


def test_nginx_config_adds_an_h2_tls_listener_on_loopback_when_given_a_certificate(tmp_path):
    from bench_upstream import render_nginx_conf

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    text = render_nginx_conf(tmp_path, 41001, 41002, "x" * 64, 1, 41003, cert, key)
    listens = [line.split()[1:] for line in text.splitlines() if line.strip().startswith("listen")]
    assert listens == [["127.0.0.1:41001;"], ["127.0.0.1:41002", "http2;"],
                       ["127.0.0.1:41003", "ssl", "http2;"]]
    assert f"ssl_certificate {cert};" in text and f"ssl_certificate_key {key};" in text


def test_full_matrix_has_an_h2_tls_target_and_only_narrows_it(monkeypatch):
    import bench
    from bench_upstream import Upstream

    def targets(upstream, *argv):
        args = bench.parse_args(["--proxy-cmd", "/bin/true", *argv])
        return {t.name: t for t in bench.build_targets(args, upstream, True)}

    with_tls = Upstream("nginx", 1001, 1002, None, 1003, "/tmp/ca.pem")  # type: ignore[arg-type]
    monkeypatch.setattr(bench, "find_proxy_command", lambda explicit: [explicit])  # none needed
    full = targets(with_tls)
    tls = full["proxy-w2-h2tls"]
    assert not tls.skip_reason
    assert "https://127.0.0.1:1003" in tls.argv and tls.argv[-2:] == ["--ca-bundle", "/tmp/ca.pem"]
    direct_tls = full["direct-h2tls"]  # the upstream's own TLS ceiling, measured in the same run
    assert (direct_tls.tool, direct_tls.upstream_port, direct_tls.skip_reason) == ("h2load-tls", 1003, "")
    without_tls = targets(Upstream("python-fallback", 1001, 1002, None))  # type: ignore[arg-type]
    assert "no TLS upstream" in without_tls["proxy-w2-h2tls"].skip_reason
    assert "TLS upstream" in without_tls["direct-h2tls"].skip_reason
    quick = targets(with_tls, "--quick")
    assert "proxy-w2-h2tls" not in quick and "direct-h2tls" not in quick
    only = targets(with_tls, "--only", "proxy-w2-h2tls")
    assert sorted(only) == ["direct-h1", "direct-h2c", "direct-h2tls", "proxy-w2-h2tls"]
    inbound = full["proxy-w2-h2in"]  # HTTP/2 clients into the proxy: their own few cases
    assert (inbound.tool, inbound.baseline, inbound.skip_reason) == ("h2load", "direct-h2c", "")
    assert inbound.argv[inbound.argv.index("--upstream") + 1] == "http://127.0.0.1:1002"
    assert inbound.cases == bench.INBOUND_CASES
    assert targets(with_tls, "--inbound-h2")["proxy-w2-h2in"].cases is None  # the whole matrix


def test_h2load_speaks_tls_only_when_asked(tmp_path):
    from bench_load import GET, LATTICE_HOST, Case, LoadFiles, h2load_argv

    files = LoadFiles(tmp_path)
    assert h2load_argv(41002, Case(GET, 4), 1, files, None)[-1].startswith("http://127.0.0.1:41002/")
    argv = h2load_argv(41002, Case(GET, 4), 1, files, None)
    assert argv[argv.index(f":authority: {LATTICE_HOST}") - 1] == "-H"  # the proxy routes on it
    assert h2load_argv(41003, Case(GET, 4), 1, files, None, tls=True)[-1].startswith(
        "https://127.0.0.1:41003/")


# ---- the bare relay (the floor of one extra hop) ------------------------------------------------


@pytest.fixture
def start_relay(tmp_path):
    procs = []

    def start(upstream_port: int) -> int:
        port = free_port()
        proc = ManagedProcess("relay", [sys.executable, str(ROOT / "benchmarks" / "bare_relay.py"),
                                        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}"],
                              tmp_path / f"relay{len(procs)}.log").start()
        procs.append(proc)
        wait_until(lambda: not port_is_free(port), proc, 20, "relay")
        return port

    yield start
    for proc in procs:
        proc.stop()


def test_bare_relay_carries_keepalive_http_with_a_large_body(fallback_upstream, start_relay):
    port = start_relay(fallback_upstream[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for method, body in [("GET", None), ("POST", b"a" * (3 << 20)), ("GET", None)]:
            conn.request(method, "/hello", body=body)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"x" * 64)
    finally:
        conn.close()


def test_bare_relay_moves_every_byte_and_passes_the_half_close_on(start_relay):
    """A server that answers with the SHA-256 of everything it read once the client half-closes."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                digest = hashlib.sha256()
                while chunk := conn.recv(65536):
                    digest.update(chunk)
                conn.sendall(digest.hexdigest().encode())

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        port = start_relay(server.getsockname()[1])
        payload = os.urandom(5 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        thread.join(10)
        assert reply == hashlib.sha256(payload).hexdigest().encode()


# ---- the field: nginx-proxy, the Go peers, inbound h2c, gRPC, one CPU ----------------------------


def _targets(monkeypatch, upstream, *argv, grpc=None):
    import bench

    monkeypatch.setattr(bench, "find_proxy_command", lambda explicit: [explicit])
    args = bench.parse_args(["--proxy-cmd", "/bin/true", *argv])
    return {t.name: t for t in bench.build_targets(args, upstream, True, grpc)}


def _fake_go(path: Path, help_text: str = "usage: aws-sigv4-proxy [<flags>]") -> Path:
    """A stand-in for a Go build: prints `help_text` on stderr for --help, as kingpin does."""
    path.write_text(f"#!/bin/sh\necho '{help_text}' >&2\n")
    path.chmod(0o755)
    return path


def test_the_field_joins_the_matrix_with_its_own_cases(monkeypatch, tmp_path):
    import bench
    from bench_load import GRPC_CASES, ONE_CPU_CASES
    from bench_peers import POOLED_BINARY, SHIPPED_BINARY
    from bench_upstream import Upstream

    _fake_go(tmp_path / SHIPPED_BINARY)
    _fake_go(tmp_path / POOLED_BINARY)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    upstream = Upstream("nginx", 1001, 1002, None, 1003, "/tmp/ca.pem")  # type: ignore[arg-type]
    full = _targets(monkeypatch, upstream, "--go-peers", str(tmp_path), "--out", str(tmp_path),
                    grpc=bench.GrpcServer(1004, 4242))
    floor = full["nginx-proxy"]  # the floor, started from a config that names its port
    assert (floor.tool, floor.baseline, floor.cases, floor.argv) == ("wrk", "direct-h1", None, None)
    m16 = full["proxy-w2-h2in-m16"]
    assert (m16.streams, m16.cases, m16.tool) == (16, bench.INBOUND_CASES, "h2load")
    assert (full["direct-grpc"].upstream_port, full["direct-grpc"].server_pid) == (1004, 4242)
    grpc = full["proxy-w2-grpc"]
    assert grpc.cases == GRPC_CASES and grpc.baseline == "direct-grpc"
    assert grpc.argv[grpc.argv.index("--upstream") + 1] == "http://127.0.0.1:1004"
    shipped, pooled = full["peer:go"], full["peer:go-pooled"]
    assert shipped.argv[0] == str(tmp_path / SHIPPED_BINARY) and not shipped.skip_reason
    assert pooled.argv[0] == str(tmp_path / POOLED_BINARY)
    assert "{upstream_port}" in " ".join(pooled.argv) and pooled.cases is None
    for name in ("proxy-1cpu-h1", "proxy-1cpu-h2", "peer:go-pooled-1cpu"):
        one = full[name]
        assert one.argv[:3] == ["taskset", "-c", "1"] and one.loader_cpus == (0,), name
        assert one.cases == ONE_CPU_CASES and not one.skip_reason
    assert "--workers" in full["proxy-1cpu-h1"].argv
    assert full["proxy-1cpu-h1"].argv[full["proxy-1cpu-h1"].argv.index("--workers") + 1] == "1"
    assert "peer:go-1cpu" not in full  # the pooled sidecar is the one a user would run
    h2in = full["proxy-1cpu-h2in"]  # h2c clients into the pinned worker, at its maximum only
    assert h2in.argv == full["proxy-1cpu-h2"].argv and h2in.loader_cpus == (0,)
    assert (h2in.tool, h2in.streams, h2in.cases, h2in.skip_reason) == ("h2load", 1, ONE_CPU_CASES[:1], "")
    quick = _targets(monkeypatch, upstream, "--quick")
    assert "proxy-1cpu-h2" not in quick and "peer:go" not in quick  # no --go-peers, no Go rows
    assert "proxy-1cpu-h2in" not in quick
    assert quick["proxy-w2-h2in-m16"].cases == bench.QUICK_INBOUND_CASES
    assert "needs grpcio" in quick["direct-grpc"].skip_reason  # no gRPC server was started
    only = _targets(monkeypatch, upstream, "--only", "proxy-w2-grpc", grpc=bench.GrpcServer(1, 2))
    assert sorted(only) == ["direct-grpc", "direct-h1", "direct-h2c", "direct-h2tls", "proxy-w2-grpc"]


def test_one_cpu_targets_need_two_cpus(monkeypatch):
    from bench_upstream import Upstream

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    one = _targets(monkeypatch, Upstream("nginx", 1001, 1002, None))["proxy-1cpu-h1"]  # type: ignore[arg-type]
    assert one.skip_reason == "needs two CPUs"


def test_go_peers_use_the_upstream_pool_flag_where_the_build_has_it(tmp_path):
    from bench_peers import POOL_FLAG, POOLED_BINARY, SHIPPED_BINARY, go_peers

    missing = go_peers(tmp_path)
    assert [p.name for p in missing] == ["peer:go", "peer:go-pooled"]
    assert all("not built" in p.skip_reason and "docs/performance.md" in p.skip_reason
               for p in missing)
    _fake_go(tmp_path / SHIPPED_BINARY, f"  {POOL_FLAG}=2  Idle connections per upstream host")
    shipped, pooled = go_peers(tmp_path)  # no tuned build needed: the flag does it
    assert not pooled.skip_reason and pooled.argv[0] == str(tmp_path / SHIPPED_BINARY)
    assert pooled.argv[-1] == f"{POOL_FLAG}=1024" and shipped.argv == pooled.argv[:-1]
    assert "--unsigned-payload" in shipped.argv
    assert shipped.argv[shipped.argv.index("--name") + 1] == "vpc-lattice-svcs"
    _fake_go(tmp_path / SHIPPED_BINARY)  # a build without the flag: the one patched in main()
    assert "not built" in go_peers(tmp_path)[1].skip_reason
    _fake_go(tmp_path / POOLED_BINARY)
    _, pooled = go_peers(tmp_path)
    assert pooled.argv == [str(tmp_path / POOLED_BINARY), *shipped.argv[1:]]


def test_go_tls_peer_runs_the_pooled_build_at_the_tls_port_trusting_the_bench_ca(tmp_path):
    from bench_peers import POOL_FLAG, POOLED_BINARY, SHIPPED_BINARY, go_peers, go_tls_peer

    missing = go_tls_peer(tmp_path, "/tmp/ca.pem")
    assert missing.name == "peer:go-pooled-tls"
    assert missing.skip_reason.startswith("not built") and POOLED_BINARY in missing.skip_reason
    _fake_go(tmp_path / POOLED_BINARY)
    assert go_tls_peer(tmp_path, "").skip_reason == "no TLS upstream (needs nginx and trustme)"
    peer = go_tls_peer(tmp_path, "/tmp/ca.pem")
    assert not peer.skip_reason and peer.env == {"SSL_CERT_FILE": "/tmp/ca.pem"}
    assert peer.argv[0] == str(tmp_path / POOLED_BINARY)
    assert peer.argv[peer.argv.index("--host") + 1] == "127.0.0.1:{upstream_h2tls_port}"
    assert peer.argv[peer.argv.index("--upstream-url-scheme") + 1] == "https"
    pooled = go_peers(tmp_path)[1]  # the same build and flags, only the upstream differs
    differ = [i for i, (a, b) in enumerate(zip(peer.argv, pooled.argv)) if a != b]
    assert len(peer.argv) == len(pooled.argv) and [peer.argv[i - 1] for i in differ] == [
        "--host", "--upstream-url-scheme"]
    _fake_go(tmp_path / SHIPPED_BINARY, f"  {POOL_FLAG}=2")  # a build with the upstream flag
    peer = go_tls_peer(tmp_path, "/tmp/ca.pem")
    assert peer.argv[0] == str(tmp_path / SHIPPED_BINARY) and peer.argv[-1] == f"{POOL_FLAG}=1024"


def test_the_go_tls_peer_joins_the_full_matrix_beside_ours_over_tls(monkeypatch, tmp_path):
    import bench
    from bench_peers import POOLED_BINARY

    _fake_go(tmp_path / POOLED_BINARY)
    with_tls = bench.Upstream("nginx", 1001, 1002, None, 1003, "/tmp/ca.pem")  # type: ignore[arg-type]
    full = _targets(monkeypatch, with_tls, "--go-peers", str(tmp_path))
    tls = full["peer:go-pooled-tls"]
    assert (tls.tool, tls.baseline, tls.cases, tls.skip_reason) == ("wrk", "direct-h1", None, "")
    assert tls.env == {**bench.BENCH_ENV, "SSL_CERT_FILE": "/tmp/ca.pem"}
    argv = bench.fill_placeholders(tls.argv, 5000, 5001, with_tls)
    assert argv[argv.index("--host") + 1] == "127.0.0.1:1003"
    assert argv[argv.index("--port") + 1] == "127.0.0.1:5000"
    assert "SSL_CERT_FILE" not in full["peer:go-pooled"].env  # the others stay as they were
    assert "peer:go-pooled-tls" not in _targets(monkeypatch, with_tls, "--go-peers", str(tmp_path),
                                                "--quick")  # as proxy-w2-h2tls: full run only
    assert "peer:go-pooled-tls" not in _targets(monkeypatch, with_tls)  # no --go-peers
    only = _targets(monkeypatch, with_tls, "--go-peers", str(tmp_path), "--only", "proxy-w2-h2tls",
                    "--only", "peer:go-pooled-tls")
    assert sorted(only) == ["direct-h1", "direct-h2c", "direct-h2tls", "peer:go-pooled-tls",
                            "proxy-w2-h2tls"]
    fallback = bench.Upstream("python-fallback", 1001, 1002, None)  # type: ignore[arg-type]
    no_tls = _targets(monkeypatch, fallback, "--go-peers", str(tmp_path))["peer:go-pooled-tls"]
    assert no_tls.skip_reason == "no TLS upstream (needs nginx and trustme)"


def _go_peers_dir() -> Path:
    """Where `make bench` looks for the Go builds (the Makefile's GO_PEERS default)."""
    return Path(os.environ.get("GO_PEERS") or Path(os.environ.get("TMPDIR") or "/tmp") / "peers")


async def test_the_go_tls_peer_speaks_h2_to_the_upstream_and_trusts_only_the_given_ca(tmp_path):
    """The pooled Go build, run as peer:go-pooled-tls runs it, against an HTTP/2-only TLS server
    whose certificate only the test's CA signed: a request comes back 200 only if Go chose h2 by
    ALPN and trusted that CA through SSL_CERT_FILE; without SSL_CERT_FILE it must fail."""
    import asyncio

    import bench
    from bench_peers import go_tls_peer, pooled_build
    from support.h2_peers import H2TestServer
    from support.upstream_servers import make_pki

    binary, _ = pooled_build(_go_peers_dir())
    if not binary.exists():
        pytest.skip(f"needs the pooled Go build ({binary}; docs/performance.md says how to build it)")
    pki = make_pki(tmp_path)

    def get_through(port: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/hello", headers={"Host": "svc.example"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    async def one_request(server_port: int, env: dict[str, str], log: str) -> tuple[int, bytes]:
        upstream = bench.Upstream("nginx", 1, 2, None, server_port, pki.ca_file)  # type: ignore[arg-type]
        port = free_port()
        argv = bench.fill_placeholders(go_tls_peer(_go_peers_dir(), pki.ca_file).argv, port, 0,
                                       upstream)
        proc = ManagedProcess("go", argv, tmp_path / log, env=env).start()
        try:
            await asyncio.to_thread(wait_until, lambda: port_is_listening(port), proc, 15, "go")
            return await asyncio.to_thread(get_through, port)
        finally:
            await asyncio.to_thread(proc.stop)

    peer_env = go_tls_peer(_go_peers_dir(), pki.ca_file).env
    async with H2TestServer(ssl_context=pki.server_context(["h2", "http/1.1"])) as server:
        status, body = await one_request(server.port, {**os.environ, **bench.BENCH_ENV, **peer_env},
                                         "go-trusting.log")
        assert status == 200, body[:200]
        assert server.stats.connections == 1
        echo = server.stats.requests[0]
        assert (echo["method"], echo["path"], echo["scheme"]) == ("GET", "/hello", "https")
        auth = dict(echo["headers"])["authorization"]
        assert auth.startswith("AWS4-HMAC-SHA256 ") and "/us-west-2/vpc-lattice-svcs/" in auth
        untrusting = {k: v for k, v in {**os.environ, **bench.BENCH_ENV}.items()
                      if k != "SSL_CERT_FILE"}
        status, _ = await one_request(server.port, untrusting, "go-untrusting.log")
        assert status == 502 and server.stats.connections == 1  # no h2 connection got through


def test_nginx_proxy_config_proxies_to_the_upstream_on_loopback_with_a_keepalive_pool(tmp_path):
    from bench_upstream import nginx_proxy_argv

    argv = nginx_proxy_argv(tmp_path, 41001, 2, 41005)
    text = (tmp_path / "nginx.conf").read_text()
    assert argv == ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    listens = [line.split()[1] for line in text.splitlines() if line.strip().startswith("listen")]
    assert listens == ["127.0.0.1:41005"]
    assert "server 127.0.0.1:41001;" in text and "keepalive 1024;" in text
    assert 'proxy_set_header Connection "";' in text and "proxy_http_version 1.1;" in text
    assert "worker_processes 2;" in text and "@" not in text.split("daemon off;")[1]


@pytest.mark.skipif(shutil.which("nginx") is None,
                    reason="needs nginx (Debian package nginx; make bench installs it)")
def test_nginx_proxy_really_proxies_keepalive_requests(fallback_upstream, tmp_path):
    from bench_upstream import nginx_proxy_argv

    port = free_port()
    proc = ManagedProcess("nginx-proxy", nginx_proxy_argv(tmp_path, fallback_upstream[0], 1, port),
                          tmp_path / "nginx-proxy.log").start()
    try:
        wait_until(lambda: not port_is_free(port), proc, 20, "nginx-proxy")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for method, body in [("GET", None), ("POST", b"p" * 70000), ("GET", None)]:
            conn.request(method, "/hello", body=body)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"x" * 64)
        conn.close()
    finally:
        proc.stop()


def test_h2load_puts_16_streams_on_each_connection_at_the_same_concurrency(tmp_path):
    from bench_load import GET, Case, LoadFiles, h2load_argv

    argv = h2load_argv(41002, Case(GET, 128), 5, LoadFiles(tmp_path), None, streams=16)
    assert argv[argv.index("-c") + 1] == "8" and argv[argv.index("-m") + 1] == "16"
    argv = h2load_argv(41002, Case(GET, 128), 5, LoadFiles(tmp_path), None)
    assert argv[argv.index("-c") + 1] == "128" and argv[argv.index("-m") + 1] == "1"


def test_a_rate_case_takes_its_share_of_the_same_targets_maximum(tmp_path):
    import bench
    from bench_load import GET, ONE_CPU_CASES, Case

    runner = bench.Bench(bench.parse_args(["--quick", "--out", str(tmp_path)]), tmp_path)
    target = bench.Target("proxy-1cpu-h1", "wrk", "direct-h1", cases=ONE_CPU_CASES,
                          loader_cpus=(0,))
    top, half, most = ONE_CPU_CASES
    assert (top.label, half.label, most.label) == ("GET c64", "GET at 50% of max", "GET at 90% of max")
    assert half.max_case == top and most.concurrency == 64
    row = Row(target.name, half.label, "wrk", "direct-h1")
    assert runner.runner(target, half, row) is None and "no valid GET c64 run" in row.problem
    runner.rows = [Row("other", top.label, "wrk", None, requests=5, rps=9000.0),
                   Row(target.name, top.label, "wrk", None, requests=5, rps=8000.0)]
    row = Row(target.name, most.label, "wrk", "direct-h1")
    run = runner.runner(target, most, row)
    assert row.offered_rps == pytest.approx(7200.0) and not row.problem
    assert run.keywords == {"rate": pytest.approx(7200.0), "cpus": (0,)}
    assert runner.runner(target, Case(GET, 64), Row(target.name, "x", "wrk", None)).keywords == {
        "cpus": (0,)}  # the maximum itself: wrk, on the loader's CPUs


def test_targets_run_only_their_own_cases_and_rates_follow_their_maximum(monkeypatch, tmp_path):
    import bench
    from bench_load import ONE_CPU_CASES
    from bench_upstream import Upstream

    args = bench.parse_args(["--quick", "--out", str(tmp_path)])
    runner = bench.Bench(args, tmp_path)
    upstream = Upstream("nginx", 41001, 41002, process=type("P", (), {"pid": 4242})())
    targets = [bench.Target("direct-h1", "wrk", None, upstream_port=41001),
               bench.Target("proxy-1cpu-h1", "wrk", "direct-h1", upstream_port=41001,
                            cases=ONE_CPU_CASES)]
    monkeypatch.setattr(bench, "preflight", lambda port, files, cases: "")
    ran = []
    monkeypatch.setattr(runner, "run_case", lambda t, c, port, pid: ran.append((t.name, c.label))
                        or Row(t.name, c.label, "wrk", t.baseline, requests=1, rps=1.0))
    runner.run_targets(targets, upstream)
    quick = [("direct-h1", c.label) for c in bench.QUICK_CASES]
    assert ran == quick + [("proxy-1cpu-h1", c.label) for c in ONE_CPU_CASES]
    assert runner.budget == pytest.approx((4 + 3 + 2) * runner.per_run_s * 1.2 + 60)  # 2 controls


def test_pinned_tree_moves_a_running_tree_and_puts_it_back():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    from bench_procs import PinnedTree, split_cpus, taskset_prefix

    assert split_cpus(set(cpus)) == ((cpus[-1],), tuple(cpus[:-1]))
    assert split_cpus({5}) is None
    assert taskset_prefix((0, 2)) == ["taskset", "-c", "0,2"] and taskset_prefix(()) == []
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        time.sleep(0.3)
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        with PinnedTree(proc.pid, (cpus[0],)):
            assert os.sched_getaffinity(proc.pid) == {cpus[0]} == os.sched_getaffinity(child)
        assert os.sched_getaffinity(proc.pid) == set(cpus) == os.sched_getaffinity(child)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# ---- the constant-rate loader -------------------------------------------------------------------


def test_rate_loader_schedule():
    from rate_loader import due_count, request_bytes

    assert [due_count(t, 100.0, 50) for t in (-0.1, 0.0, 0.0099, 0.01, 0.25, 9.0)] == [
        0, 1, 1, 2, 26, 50]  # the k-th request is due at k / rate, never more than the total
    assert request_bytes("GET", "/hello", "h.example", b"") == (
        b"GET /hello HTTP/1.1\r\nHost: h.example\r\n\r\n")
    assert request_bytes("POST", "/p", "h", b"abc").endswith(
        b"Content-Length: 3\r\n\r\nabc")


def test_rate_loader_reads_responses_in_pieces():
    from rate_loader import ResponseReader

    stream = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
              b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\n"
              b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    for size in (1, 7, len(stream)):  # byte by byte, in odd pieces, all at once
        reader = ResponseReader()
        statuses = []
        for i in range(0, len(stream), size):
            statuses += reader.feed(stream[i:i + size])
        assert statuses == [200, 503, 200, 204] and reader.close and not reader.buffer
    with pytest.raises(ValueError):
        ResponseReader().feed(b"SSH-2.0-OpenSSH\r\n\r\n")


class _StallingServer:
    """HTTP/1.1 on loopback: answers 200 'ok'; from `stall_at` seconds after its first request
    every answer waits until `stall_at + stall_s`; the request numbered `fail_status_every`
    (1, 2, ...) gets a 503 and the one numbered `drop_nth` a closed connection, no answer."""

    def __init__(self, stall_at: float = 0.0, stall_s: float = 0.0, fail_status_every: int = 0,
                 drop_nth: int = 0) -> None:
        self.stall_at, self.stall_s = stall_at, stall_s
        self.fail_status_every, self.drop_nth = fail_status_every, drop_nth
        self.count = 0
        self.first = None
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""
        with conn:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                buffer = buffer.split(b"\r\n\r\n", 1)[1]
                with self.lock:
                    self.count += 1
                    n = self.count
                    self.first = self.first or time.monotonic()
                    stall_end = self.first + self.stall_at + self.stall_s
                    stalled = self.stall_s and time.monotonic() >= self.first + self.stall_at
                if stalled and time.monotonic() < stall_end:
                    time.sleep(stall_end - time.monotonic())
                if n == self.drop_nth:
                    return
                status = b"503 Busy" if self.fail_status_every and n % self.fail_status_every == 0 else b"200 OK"
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")


def run_rate_loader(port: int, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rate_loader.py"),
                          "--port", str(port), *args], capture_output=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def test_rate_loader_holds_its_rate_and_charges_a_stall_to_every_request_due_in_it():
    """300 requests at 200/s on 2 connections; the server stops answering for 0.3 s. Timed
    from when each request was due, the ~60 requests due in the stall all wait (p99 near the
    stall); timed from when each went out, only the 2 in flight would have."""
    with _StallingServer(stall_at=0.5, stall_s=0.3) as server:
        result = run_rate_loader(server.port, "--rate", "200", "--duration", "1.5",
                                 "--connections", "2", "--path", "/x")
    assert result["requests"] == 300 == server.count
    assert (result["non_2xx"], result["socket_errors"]) == (0, 0)
    assert 170 <= result["rps"] <= 210  # the schedule held, stall included
    assert 200_000 <= result["p99_us"] <= 900_000
    assert result["p50_us"] < 100_000


def test_rate_loader_counts_error_statuses_and_a_dropped_connection_and_carries_on():
    with _StallingServer(fail_status_every=10, drop_nth=55) as server:
        result = run_rate_loader(server.port, "--rate", "200", "--duration", "0.5",
                                 "--connections", "4", "--drain", "3")
    assert result["socket_errors"] == 1  # request 55: its connection closed, no answer
    assert result["requests"] == 99  # the other 99 of 100 answered, on a new connection too
    assert result["non_2xx"] == 10  # requests 10, 20, ... 100 answered 503


def test_json_results_parse_and_garbage_is_a_parse_error():
    line = json.dumps({"offered_rps": 10.0, "requests": 9, "duration_s": 1.0, "rps": 9.0,
                       "p50_us": 10.0, "p99_us": 20.0, "non_2xx": 1, "socket_errors": 0})
    result = bench_parse.parse_json_result("warming up\n" + line + "\n", "rate_loader")
    assert (result.requests, result.rps, result.p99_us, result.non_2xx) == (9, 9.0, 20.0, 1)
    assert not result.valid
    with pytest.raises(ParseError, match="rate_loader printed no result: 'Traceback"):
        bench_parse.parse_json_result("Traceback (most recent call last):\n  boom\n", "rate_loader")
    with pytest.raises(ParseError):
        bench_parse.parse_json_result("", "the gRPC loop")


# ---- the gRPC loop ------------------------------------------------------------------------------


async def test_grpc_loop_counts_answered_calls_against_a_real_server():
    from bench_grpc import listening_port, unary_loop
    from grpc_support.echo_service import EchoService

    async with EchoService() as service:
        result = await unary_loop(service.port, "127.0.0.1", seconds=10, max_calls=25,
                                  concurrency=4, timeout_s=5)
    assert result["requests"] == 25 and (result["non_2xx"], result["socket_errors"]) == (0, 0)
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert len(service.metadata) == 25
    assert listening_port("starting\nlistening 50123\n") == 50123 and listening_port("") is None


async def test_grpc_loop_counts_failed_calls():
    from bench_grpc import unary_loop

    result = await unary_loop(free_port(), "127.0.0.1", seconds=10, max_calls=3, concurrency=1,
                              timeout_s=2)  # nothing listens there
    assert result["requests"] == 3 == result["socket_errors"] and result["rps"] == 0


# ---- the report's new tables --------------------------------------------------------------------


def _field_rows() -> list[Row]:
    def row(target, case, rps, cpu, p99=10_000.0, baseline="direct-h1", **extra):
        return Row(target, case, "wrk", baseline, requests=100, rps=rps, p50_us=1000.0,
                   p99_us=p99, cpu_us_per_req=cpu, peak_rss_kib=1024, **extra)

    return [
        row("direct-h1", "GET c128", 80000.0, 10.0, baseline=None),
        row("nginx-proxy", "GET c128", 40000.0, 20.0),
        row("proxy-w2-h1", "GET c128", 16000.0, 80.0),
        row("proxy-w2-h2", "GET c128", 20000.0, 60.0),
        row("proxy-w2-h2in", "GET c128", 8000.0, 150.0, baseline="direct-h2c"),
        row("proxy-w2-h2in-m16", "GET c128", 12000.0, 66.0, baseline="direct-h2c"),
        row("peer:go", "GET c128", 8000.0, 160.0),
        row("peer:go-pooled", "GET c128", 16000.0, 80.0),
        row("proxy-w2-h1", "POST 1MiB c1", 500.0, 700.0),  # no floor row for this case
        row("proxy-1cpu-h1", "GET c64", 10000.0, 90.0, p99=5000.0),
        row("proxy-1cpu-h1", "GET at 50% of max", 4990.0, 95.0, p99=2000.0, offered_rps=5000.0),
        row("proxy-1cpu-h1", "GET at 90% of max", 8000.0, 99.0, p99=90_000.0, offered_rps=9000.0,
            load_side_rps=8990.0, load_side_p99_us=3000.0),
        row("peer:go-pooled-1cpu", "GET c64", 8000.0, 100.0),
        row("peer:go-pooled-1cpu", "GET at 50% of max", 4000.0, 100.0, offered_rps=4000.0),
        row("peer:go-pooled-1cpu", "GET at 90% of max", 0.0, None, non_2xx=3,
            offered_rps=7200.0),
        Row("direct-grpc", "gRPC unary c16", "grpc", None, requests=50, rps=2500.0,
            p50_us=5000.0, p99_us=15000.0, cpu_us_per_req=280.0),
        Row("proxy-w2-grpc", "gRPC unary c16", "grpc", "direct-grpc", requests=50, rps=2000.0,
            p50_us=7000.0, p99_us=18000.0, cpu_us_per_req=300.0),
    ]


def test_every_proxy_gets_ratios_to_the_floor_of_the_same_case():
    rows = _field_rows()
    compute_ratios(rows)
    by = {(r.target, r.case): r for r in rows}
    assert by[("proxy-w2-h1", "GET c128")].ratios_to_floor == {
        "rps": 0.4, "cpu_us_per_req": 4.0, "p99_us": 1.0, "peak_rss_kib": 1.0}
    assert by[("peer:go", "GET c128")].ratios_to_floor["cpu_us_per_req"] == 8.0
    assert by[("proxy-w2-h2in", "GET c128")].ratios_to_floor["cpu_us_per_req"] == 7.5
    assert by[("nginx-proxy", "GET c128")].ratios_to_floor == {}  # the floor itself
    assert by[("direct-h1", "GET c128")].ratios_to_floor == {}
    assert by[("proxy-w2-h1", "POST 1MiB c1")].ratios_to_floor == {}  # no floor in that case
    rows[1].non_2xx = 1  # a floor with errors is no floor
    compute_ratios(rows)
    assert all(not r.ratios_to_floor for r in rows)


def test_floor_and_summary_tables():
    rows = _field_rows()
    compute_ratios(rows)
    floor = floor_table(rows).splitlines()
    assert floor[2].startswith("| case | proxy-w2-h1 | proxy-w2-h2 | proxy-w2-h2in |")
    assert floor[4].startswith("| GET c128 | RPS ×0.40, CPU ×4.00 | RPS ×0.50, CPU ×3.00 |")
    summary = summary_table(rows, ["GET c128", "POST 4KiB c128"]).splitlines()
    assert summary[0] == ("| target | case | RPS | p99 ms | CPU µs/req | RPS vs pooled Go "
                          "(proxy-w2-h2tls: vs peer:go-pooled-tls) | CPU vs nginx-proxy |")
    assert [line.split(" | ")[0] for line in summary[2:]] == [
        "| nginx-proxy", "| peer:go", "| peer:go-pooled", "| proxy-w2-h1", "| proxy-w2-h2"]
    assert summary[2] == "| nginx-proxy | GET c128 | 40,000 | 10.00 | 20 | ×2.50 | — |"
    assert summary[3] == "| peer:go | GET c128 | 8,000 | 10.00 | 160 | ×0.50 | ×8.00 |"
    assert summary[6] == "| proxy-w2-h2 | GET c128 | 20,000 | 10.00 | 60 | ×1.25 | ×3.00 |"
    rows.append(Row("proxy-w2-h2tls", "GET c128", "wrk", "direct-h1", requests=9, rps=12000.0,
                    cpu_us_per_req=70.0))
    compute_ratios(rows)  # no Go over TLS in the run: no yardstick for ours over TLS
    assert summary_table(rows, ["GET c128"]).splitlines()[-1] == (
        "| proxy-w2-h2tls | GET c128 | 12,000 | 0.00 | 70 | — | ×3.50 |")
    rows.append(Row("peer:go-pooled-tls", "GET c128", "wrk", "direct-h1", requests=9,
                    rps=10000.0, cpu_us_per_req=100.0))
    compute_ratios(rows)  # ours over TLS against Go over TLS, not against Go over HTTP/1.1
    summary = summary_table(rows, ["GET c128"]).splitlines()
    assert summary[5] == "| peer:go-pooled-tls | GET c128 | 10,000 | 0.00 | 100 | — | ×5.00 |"
    assert summary[-1] == "| proxy-w2-h2tls | GET c128 | 12,000 | 0.00 | 70 | ×1.20 | ×3.50 |"
    assert summary[2] == "| nginx-proxy | GET c128 | 40,000 | 10.00 | 20 | ×2.50 | — |"
    assert summary_table(rows, ["POST 4KiB c128"]) == ""


def test_inbound_h2c_beside_inbound_http1_for_the_same_requests():
    from bench_report import inbound_comparisons, inbound_table

    rows = _field_rows()
    assert inbound_comparisons(rows) == [
        {"case": "GET c128", "target": "proxy-w2-h2in", "h1_target": "proxy-w2-h2",
         "streams_per_connection": 1, "h1_rps": 20000.0, "h1_cpu_us_per_req": 60.0,
         "h2c_rps": 8000.0, "h2c_cpu_us_per_req": 150.0, "cpu_ratio": 2.5},
        {"case": "GET c128", "target": "proxy-w2-h2in-m16", "h1_target": "proxy-w2-h2",
         "streams_per_connection": 16, "h1_rps": 20000.0, "h1_cpu_us_per_req": 60.0,
         "h2c_rps": 12000.0, "h2c_cpu_us_per_req": 66.0, "cpu_ratio": pytest.approx(1.1)}]
    table = inbound_table(rows)
    assert ("| GET c128 | proxy-w2-h2 | 20,000 | 60 | proxy-w2-h2in | 1 | 8,000 | 150 | ×2.50 | no |"
            in table)
    assert ("| GET c128 | proxy-w2-h2 | 20,000 | 60 | proxy-w2-h2in-m16 | 16 | 12,000 | 66 | ×1.10 "
            "| yes |" in table)
    # one worker on a CPU of its own: h2c clients against HTTP/1.1 clients into that worker
    rows += [Row("proxy-1cpu-h2", "GET c64", "wrk", "direct-h1", requests=10, rps=15000.0,
                 p50_us=900.0, p99_us=7000.0, cpu_us_per_req=66.0),
             Row("proxy-1cpu-h2in", "GET c64", "h2load", "direct-h2c", requests=10, rps=15500.0,
                 p50_us=900.0, p99_us=7000.0, cpu_us_per_req=64.0)]
    pinned = inbound_comparisons(rows)[-1]
    assert (pinned["target"], pinned["h1_target"], pinned["cpu_ratio"]) == (
        "proxy-1cpu-h2in", "proxy-1cpu-h2", pytest.approx(64 / 66))
    assert "| GET c64 | proxy-1cpu-h2 | 15,000 | 66 | proxy-1cpu-h2in | 1 | 15,500 | 64 | ×0.97 | yes |" in (
        inbound_table(rows))
    rows = rows[:-2]
    assert "| proxy-w2-grpc | gRPC unary c16 | 2,000 | 7.00 | 18.00 | 300 | ok |" in table
    rows[3].socket_errors = 2  # the HTTP/1.1 row failed: nothing to compare with
    assert inbound_comparisons(rows) == [] and "gRPC unary" in inbound_table(rows)


def test_one_cpu_table_shows_offered_and_achieved_rates_and_flags_failures():
    from bench_report import one_cpu_table

    rows = _field_rows()
    table = one_cpu_table(rows).splitlines()
    assert table[0] == ("| target | max: case | RPS | p99 ms | CPU µs/req | GET at 50% of max: "
                        "offered → achieved RPS | p99 ms | load side alone: RPS, p99 ms | GET at "
                        "90% of max: offered → achieved RPS | p99 ms | load side alone: RPS, p99 "
                        "ms |")
    assert table[2] == ("| proxy-1cpu-h1 | GET c64 | 10,000 | 5.00 | 90 | 5,000 → 4,990 | 2.00 "
                        "| — | 9,000 → 8,000 | 90.00 | 8,990, 3.00 |")
    assert table[3].startswith("| peer:go-pooled-1cpu | GET c64 | 8,000 | 10.00 | 100 | "
                               "4,000 → 4,000 | 10.00 | — | FLAGGED: 3 non-2xx")
    assert one_cpu_table(rows[:9]) == ""


def test_rate_rows_are_no_yardstick_between_targets():
    rows = _field_rows()
    rows.append(Row("proxy-1cpu-h2", "GET at 50% of max", "wrk", "direct-h1", requests=9,
                    rps=6000.0, offered_rps=6000.0))
    rows.append(Row("proxy-1cpu-h2", "GET c64", "wrk", "direct-h1", requests=9, rps=12000.0))
    pairs = {(c["peer"], c["target"], c["case"]) for c in peer_comparisons(rows)}
    assert ("peer:go-pooled-1cpu", "proxy-1cpu-h2", "GET c64") in pairs
    assert not any("of max" in case for _, _, case in pairs)


# ---- issue 28's targets, judged from the rows -----------------------------------------------------


def _target_rows() -> list[Row]:
    """One run's rows for every target of issue 28: some met, some not, some flagged or absent."""
    def row(target, case, rps, cpu=50.0, p99_ms=10.0, **extra):
        return Row(target, case, "wrk", "direct-h1", requests=100, rps=rps, p50_us=1000.0,
                   p99_us=p99_ms * 1000, cpu_us_per_req=cpu, **extra)

    return [
        row("peer:go-pooled", "GET c128", 10000.0, 80.0),
        row("peer:go-pooled", "POST 4KiB c128", 8000.0, 120.0),
        row("proxy-w2-h1", "GET c128", 21000.0, 38.0, p99_ms=10.0),  # must and goal met
        row("proxy-w2-h1", "POST 4KiB c128", 13000.0, 55.0, p99_ms=35.0),  # 1.625×, 55 µs
        row("proxy-w2-h1", "POST 1MiB c128", 300.0, 900.0, p99_ms=200.0),
        row("proxy-w2-h2", "GET c32", 15000.0, 50.0),
        row("proxy-w2-h2", "GET c128", 17000.0, 44.0),  # 1.7×: short of 1.8×
        row("proxy-w2-h2", "POST 4KiB c128", 0.0, None, non_2xx=3),  # flagged
        row("proxy-w2-h2in", "GET c32", 9000.0, 55.0),  # ×1.10
        row("proxy-w2-h2in", "GET c128", 9000.0, 57.2),  # ×1.30
        row("proxy-w2-h2in", "POST 4KiB c128", 9000.0, 100.0),  # its HTTP/1.1 row is flagged
        row("proxy-w2-h2in-m16", "GET c32", 15000.0, 50.0),
        row("proxy-w2-h2in-m16", "GET c128", 15000.0, 44.0),
        row("proxy-w2-h2tls", "GET c128", 16000.0, 60.0),
        row("proxy-w2-h2tls", "POST 4KiB c128", 9000.0, 90.0),
        row("peer:go-pooled-tls", "GET c128", 10000.0, 70.0),  # and no POST row in this run
        row("peer:go", "GET c128", 7000.0, 160.0, p99_ms=40.0),
        row("peer:go", "POST 4KiB c128", 6000.0, 200.0, p99_ms=30.0),
        row("peer:go", "POST 1MiB c128", 200.0, 4000.0, p99_ms=400.0),
        row("proxy-1cpu-h1", "GET c64", 12000.0, 80.0, p99_ms=5.0),
        row("proxy-1cpu-h1", "GET at 50% of max", 6000.0, 80.0, p99_ms=2.0, offered_rps=6000.0),
        row("proxy-1cpu-h1", "GET at 90% of max", 10800.0, 80.0, p99_ms=30.0, offered_rps=10800.0),
        row("peer:go-pooled-1cpu", "GET c64", 9000.0, 110.0, p99_ms=10.0),
        row("peer:go-pooled-1cpu", "GET at 50% of max", 4500.0, 110.0, p99_ms=3.0,
            offered_rps=4500.0),
        row("peer:go-pooled-1cpu", "GET at 90% of max", 8100.0, 110.0, p99_ms=20.0,
            offered_rps=8100.0),
        Row("proxy-1cpu-h2", "GET c64", "wrk", "direct-h1", problem="skipped: needs two CPUs"),
        Row("proxy-1cpu-h2", "GET at 50% of max", "wrk", "direct-h1",
            problem="skipped: needs two CPUs"),
        Row("proxy-1cpu-h2", "GET at 90% of max", "wrk", "direct-h1",
            problem="skipped: needs two CPUs"),
        Row("proxy-1cpu-h2in", "GET c64", "h2load", "direct-h2c", problem="skipped: needs two CPUs"),
    ]


def test_round_two_targets_are_judged_from_the_rows_of_the_run():
    from bench_targets import verdicts

    lines = {v.target: v for v in verdicts(_target_rows())}
    assert len(lines) == 12  # 6 against Go, 3 inbound, 2 on one CPU, the first round
    get_h1 = lines["HTTP/1.1 upstream, GET c128: `proxy-w2-h1` ≥ 1.5× `peer:go-pooled`'s RPS, "
                   "≤ 50 µs CPU/req (goal ≥ 2×, ≤ 40 µs)"]
    assert (get_h1.measured, get_h1.met, get_h1.goal_met) == (
        "RPS ×2.10 (21,000 against 10,000), CPU 38 µs/req", "yes", "yes")
    post_h1 = lines["HTTP/1.1 upstream, POST 4KiB c128: `proxy-w2-h1` ≥ 1.5× `peer:go-pooled`'s "
                    "RPS, ≤ 50 µs CPU/req (goal ≥ 2×, ≤ 40 µs)"]
    assert (post_h1.measured, post_h1.met, post_h1.goal_met) == (
        "RPS ×1.62 (13,000 against 8,000), CPU 55 µs/req", "no: CPU", "no: RPS, CPU")
    get_h2 = lines["h2c upstream, GET c128: `proxy-w2-h2` ≥ 1.8× `peer:go-pooled`'s RPS, "
                   "≤ 45 µs CPU/req (goal ≥ 2.2×, ≤ 45 µs)"]
    assert (get_h2.met, get_h2.goal_met) == ("no: RPS", "no: RPS")
    post_h2 = lines["h2c upstream, POST 4KiB c128: `proxy-w2-h2` ≥ 1.8× `peer:go-pooled`'s RPS, "
                    "≤ 45 µs CPU/req (goal ≥ 2.2×, ≤ 45 µs)"]
    assert (post_h2.measured, post_h2.goal_met) == ("—", "not run")
    assert post_h2.met == ("not run: proxy-w2-h2 POST 4KiB c128 FLAGGED: 3 non-2xx, 0 socket "
                           "errors of 100")
    tls_get = lines["TLS h2 upstream, GET c128: `proxy-w2-h2tls` ≥ 1.5× `peer:go-pooled-tls`'s RPS"]
    assert (tls_get.measured, tls_get.met, tls_get.goal_met) == (
        "RPS ×1.60 (16,000 against 10,000)", "yes", "—")
    tls_post = lines["TLS h2 upstream, POST 4KiB c128: `proxy-w2-h2tls` ≥ 1.5× "
                     "`peer:go-pooled-tls`'s RPS"]
    assert tls_post.met == "not run: no peer:go-pooled-tls row for POST 4KiB c128 in this run"
    one = lines["Inbound h2c, 1 stream per connection: `proxy-w2-h2in` CPU/req within 1.2× of "
                "`proxy-w2-h2`'s (HTTP/1.1 in)"]
    assert one.measured == "GET c32 ×1.10 (55 against 50 µs); GET c128 ×1.30 (57 against 44 µs)"
    assert one.met == ("no: GET c128; not run: proxy-w2-h2 POST 4KiB c128 FLAGGED: 3 non-2xx, "
                       "0 socket errors of 100")
    m16 = lines["Inbound h2c, 16 streams per connection: `proxy-w2-h2in-m16` CPU/req within 1.2× "
                "of `proxy-w2-h2`'s (HTTP/1.1 in)"]
    assert m16.met == "yes"
    pinned = lines["Inbound h2c, 1 stream per connection, one worker on one CPU: `proxy-1cpu-h2in` "
                   "CPU/req within 1.2× of `proxy-1cpu-h2`'s (HTTP/1.1 in)"]
    assert (pinned.measured, pinned.met) == ("—", "not run: proxy-1cpu-h2in skipped: needs two CPUs")
    cpu_h1 = lines["One worker on one CPU: `proxy-1cpu-h1` max RPS above `peer:go-pooled-1cpu`'s, "
                   "p99 at 50% and 90% of each one's max below Go's"]
    assert cpu_h1.measured == ("max (GET c64) 12,000 against 9,000 RPS (×1.33); p99 at 50% 2.00 "
                               "against 3.00 ms; p99 at 90% 30.00 against 20.00 ms")
    assert cpu_h1.met == "no: p99 at 90%"
    cpu_h2 = lines["One worker on one CPU: `proxy-1cpu-h2` max RPS above `peer:go-pooled-1cpu`'s, "
                   "p99 at 50% and 90% of each one's max below Go's"]
    assert (cpu_h2.measured, cpu_h2.met) == ("—", "not run: proxy-1cpu-h2 skipped: needs two CPUs")
    first = lines["First round kept: `proxy-w2-h1` p99 below `peer:go`'s (as shipped) at c128"]
    assert first.measured == ("GET c128 10.00 against 40.00 ms; POST 4KiB c128 35.00 against "
                              "30.00 ms; POST 1MiB c128 200.00 against 400.00 ms")
    assert first.met == "no: POST 4KiB c128"


def test_round_two_targets_met_partly_run_and_not_run():
    from bench_targets import targets_table, verdicts

    rows = [r for r in _target_rows()
            if not (r.target == "peer:go" and r.case == "POST 1MiB c128")]
    for r in rows:
        if r.target == "proxy-w2-h1" and r.case == "POST 4KiB c128":
            r.p99_us = 20_000.0  # now below Go's 30 ms
        if r.target == "proxy-1cpu-h1" and r.case == "GET at 90% of max":
            r.p99_us = 15_000.0
    rows = [r for r in rows if not r.target.startswith("proxy-1cpu-h2")] + [
        Row("proxy-1cpu-h2", "GET c64", "wrk", "direct-h1", requests=100, rps=16000.0,
            p50_us=900.0, p99_us=7000.0, cpu_us_per_req=60.0),
        Row("proxy-1cpu-h2in", "GET c64", "h2load", "direct-h2c", requests=100, rps=15000.0,
            p50_us=900.0, p99_us=7000.0, cpu_us_per_req=66.0)]
    met = {v.target.split(" p99")[0]: v.met for v in verdicts(rows)}
    pinned = next(v for v in verdicts(rows) if "`proxy-1cpu-h2in`" in v.target)
    assert (pinned.measured, pinned.met) == ("GET c64 ×1.10 (66 against 60 µs)", "yes")
    assert met["First round kept: `proxy-w2-h1`"] == (
        "not all run: no peer:go row for POST 1MiB c128 in this run")
    assert met["One worker on one CPU: `proxy-1cpu-h1` max RPS above `peer:go-pooled-1cpu`'s,"] == "yes"
    table = targets_table([]).splitlines()  # a run without any of the rows (a quick run, say)
    assert table[:2] == ["| target | measured | met | goal met |", "|---|---|---|---|"]
    assert len(table) == 14 and all(" | — | not run: no " in line for line in table[2:])
    assert "| not run: no proxy-w2-h1 rows in this run; no peer:go-pooled rows in this run | not run |" in table[2]


def test_a_rate_row_whose_load_side_alone_could_not_hold_the_rate_is_not_judged():
    """A p99 at a constant rate is ours only when the rate loader straight to the upstream (no
    proxy, same CPUs, same rate) could hold it: else the row measured the load side."""
    from bench_targets import load_side_bound, verdicts

    def one_cpu_h1(rows):
        return next(v for v in verdicts(rows) if "`proxy-1cpu-h1` max RPS" in v.target)

    def with_90(p99_us, **control):
        rows = [r for r in _target_rows()
                if not (r.target == "proxy-1cpu-h1" and r.case == "GET at 90% of max")]
        rows.append(Row("proxy-1cpu-h1", "GET at 90% of max", "wrk", "direct-h1", requests=100,
                        rps=10_700.0, p50_us=900.0, p99_us=p99_us, offered_rps=10_800.0, **control))
        return rows

    go_90 = next(r for r in _target_rows()
                 if r.target == "peer:go-pooled-1cpu" and r.case == "GET at 90% of max")
    assert go_90.p99_us == 20_000.0
    # no control ran, or it held the rate well below Go's p99: judged as measured
    assert one_cpu_h1(with_90(30_000.0)).met == "no: p99 at 90%"
    held = with_90(30_000.0, load_side_rps=10_790.0, load_side_p99_us=4_000.0)
    assert one_cpu_h1(held).met == "no: p99 at 90%"
    # the load side alone was no faster than Go's whole path: not judged, with its figures
    slow = with_90(30_000.0, load_side_rps=10_790.0, load_side_p99_us=25_000.0)
    assert one_cpu_h1(slow).met == ("not all run: p99 at 90% not judged: the load side alone "
                                    "(no proxy) at 10,800 RPS read p99 25.00 ms")
    short = with_90(30_000.0, load_side_rps=9_000.0, load_side_p99_us=900_000.0)
    assert one_cpu_h1(short).met == ("not all run: p99 at 90% not judged: the load side alone "
                                     "(no proxy) at 10,800 RPS reached only 9,000")
    # a bound load side never turns a pass into anything else
    assert one_cpu_h1(with_90(15_000.0, load_side_rps=9_000.0, load_side_p99_us=1.0)).met == "yes"
    # ours flagged (unanswered at the end): not judged when its control failed too, else as flagged
    flagged = with_90(30_000.0, load_side_rps=0.0, load_side_p99_us=0.0)
    flagged[-1].socket_errors = 500
    assert one_cpu_h1(flagged).met == ("not all run: p99 at 90% not judged: the load side alone "
                                       "(no proxy) at 10,800 RPS failed")
    flagged[-1].load_side_rps, flagged[-1].load_side_p99_us = 10_800.0, 2_000.0
    assert one_cpu_h1(flagged).met.startswith("not all run: proxy-1cpu-h1 GET at 90% of max FLAGGED")
    assert load_side_bound(flagged[-1], go_90) == ""


def test_a_rate_row_gets_its_load_side_control_from_the_upstream_alone(tmp_path):
    """After a constant-rate row, the rate loader runs straight to the upstream at the same rate
    (a real server on loopback): its achieved rate and p99 go on the row; a dead upstream is
    recorded as failed, never as a figure."""
    import http.server
    import threading

    import bench
    from bench_load import ONE_CPU_CASES

    class Quiet(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        runner = bench.Bench(bench.parse_args(["--quick", "--out", str(tmp_path), "--duration", "1"]),
                             tmp_path)
        runner.upstream_pid, runner.upstream_h1_port = os.getpid(), server.server_address[1]
        target = bench.Target("proxy-1cpu-h1", "wrk", "direct-h1", cases=ONE_CPU_CASES)
        row = Row(target.name, ONE_CPU_CASES[2].label, "wrk", "direct-h1", offered_rps=200.0)
        runner.load_side_alone(target, ONE_CPU_CASES[2], row)
        assert row.load_side_rps == pytest.approx(200.0, rel=0.1)
        assert 0 < row.load_side_p99_us < 1_000_000
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    dead = Row(target.name, ONE_CPU_CASES[2].label, "wrk", "direct-h1", offered_rps=200.0)
    runner.load_side_alone(target, ONE_CPU_CASES[2], dead)  # nothing listens there now
    assert dead.load_side_rps == 0.0


def test_the_report_names_the_interpreter_the_proxy_runs_on(tmp_path):
    """bench.md's title says which Python ran ours: the one beside the proxy's script, its
    version, whether libpython was a shared library in that process, and which build of the
    package it imports (this venv's: compiled in make test's first pass, else pure)."""
    import platform

    import bench
    from support.compiled import compiled_modules

    here = Path(sys.executable)
    script = here.parent / "sigv4proxy"
    linkage = "shared" if any("libpython" in line for line in open("/proc/self/maps")) else "static"
    described = bench.proxy_interpreter([str(script)])
    assert described.startswith(f"Python {platform.python_version()} (")
    build = (f"{len(compiled_modules())} modules compiled (mypyc)"
             if os.environ.get("SIGV4PROXY_EXPECT_COMPILED") == "1" else "pure Python")
    assert described.endswith(f"libpython {linkage}), {build}"), described
    # as make bench names it: relative to the checkout (the probe itself runs from "/")
    assert bench.proxy_interpreter([os.path.relpath(script)]) == described
    assert bench.proxy_interpreter([str(tmp_path / "sigv4proxy")]).startswith("unknown (")
    assert bench.proxy_interpreter(None) == "none"
