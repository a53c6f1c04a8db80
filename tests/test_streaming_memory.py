"""Bodies stream through the proxy: 1 GiB up and 1 GiB down through a real `sigv4proxy serve`
process (h2c upstream to a `sigv4proxy sim` process) while the proxy's peak RSS (VmHWM from
/proc/<pid>/status) stays under 100 MB. The simulator hashes the upload as it arrives and echoes
the sha256; the download is the simulator's `x-sim-response-bytes` pattern, hashed here.

The client is a raw HTTP/1.1 socket writing one pre-made 1 MiB block 1024 times (a fast
generator), so the client is never the bottleneck and the test measures the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from support.proxy import ACCESS_KEY, LATTICE_HOST, PRINCIPAL, SECRET_KEY, SESSION_TOKEN, write_identities

MIB = 1 << 20
TOTAL = 1 << 30  # 1 GiB
RSS_LIMIT_KB = 100 * 1000  # 100 MB
TRANSFER_TIMEOUT_S = 120  # a hang fails; on this 2-core machine 1 GiB takes ~5-10 s
START_TIMEOUT_S = 20

# Byte i of the simulator's download body is i % 256; built here from that definition.
PATTERN_BLOCK = bytes(range(256)) * (MIB // 256)
UPLOAD_BLOCK = hashlib.sha256(b"upload block").digest() * (MIB // 32)  # not the download pattern


def _wait_for_line(path: pathlib.Path, pattern: re.Pattern[str], proc: subprocess.Popen) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[3]} exited with {proc.returncode}: {text[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.args[3]} did not start in {START_TIMEOUT_S}s: {text[-2000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def _process(argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@dataclass
class Stack:
    proxy_pid: int
    proxy_port: int
    proxy_log: pathlib.Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """A simulator process and a proxy process (h2c to it), each on an ephemeral loopback port."""
    d = tmp_path_factory.mktemp("streaming")
    sim_log, proxy_log = d / "sim.log", d / "proxy.log"
    sim_argv = [sys.executable, "-m", "sigv4proxy", "sim", "--listen", "127.0.0.1:0",
                "--identities", str(write_identities(d))]
    with _process(sim_argv, sim_log) as sim:
        sim_port = int(_wait_for_line(sim_log, re.compile(r"listening on http://127\.0\.0\.1:(\d+)"), sim).group(1))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_SESSION_TOKEN=SESSION_TOKEN, AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE=str(d / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(d / "no-creds"))
        proxy_argv = [sys.executable, "-m", "sigv4proxy", "serve", "--listen", "127.0.0.1:0",
                      "--admin", "127.0.0.1:0", "--upstream", f"http://127.0.0.1:{sim_port}",
                      "--upstream-protocol", "h2"]
        with _process(proxy_argv, proxy_log, env) as proxy:
            port = int(_wait_for_line(proxy_log, re.compile(r'"listen": "127\.0\.0\.1:(\d+)"'), proxy).group(1))
            yield Stack(proxy.pid, port, proxy_log)
            assert proxy.poll() is None, "the proxy died during the test"
        text = proxy_log.read_bytes()
        assert SECRET_KEY.encode() not in text and SESSION_TOKEN.encode() not in text


def peak_rss_kb(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far, in kB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # last value wins; names lowercase
    body_length: int
    body_sha256: str
    body_prefix: bytes


async def read_response(reader: asyncio.StreamReader, keep: int = 64 * 1024) -> Response:
    """An HTTP/1.1 response with a Content-Length body, hashed as it streams (never held whole)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "content-length" in headers, f"expected a Content-Length response, got {headers}"
    remaining = int(headers["content-length"])
    digest, seen, prefix = hashlib.sha256(), 0, b""
    while remaining:
        chunk = await reader.read(min(remaining, MIB))
        if not chunk:
            raise AssertionError(f"body cut short after {seen} bytes")
        digest.update(chunk)
        if len(prefix) < keep:
            prefix += chunk[: keep - len(prefix)]
        seen += len(chunk)
        remaining -= len(chunk)
    return Response(int(status_line.split()[1]), headers, seen, digest.hexdigest(), prefix)


async def upload(port: int, blocks: int) -> tuple[Response, str, float]:
    """POST `blocks` MiB with Content-Length; returns the response, our sha256 and the seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        writer.write(f"POST /upload HTTP/1.1\r\nHost: {LATTICE_HOST}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {blocks * MIB}\r\n\r\n".encode())
        sent = hashlib.sha256()
        for _ in range(blocks):
            writer.write(UPLOAD_BLOCK)
            sent.update(UPLOAD_BLOCK)
            await writer.drain()
        response = await read_response(reader)
        return response, sent.hexdigest(), time.perf_counter() - started
    finally:
        writer.close()


async def download(port: int, size: int) -> tuple[Response, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        writer.write(f"GET /download HTTP/1.1\r\nHost: {LATTICE_HOST}\r\nx-sim-response-bytes: {size}\r\n\r\n".encode())
        await writer.drain()
        response = await read_response(reader)
        return response, time.perf_counter() - started
    finally:
        writer.close()


def expected_pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(size, len(PATTERN_BLOCK))
    for _ in range(full):
        digest.update(PATTERN_BLOCK)
    digest.update(PATTERN_BLOCK[:rest])
    return digest.hexdigest()


async def test_1gib_upload_streams_with_bounded_proxy_memory(stack):
    before = peak_rss_kb(stack.proxy_pid)
    assert before > 10_000  # the live proxy process (a Python interpreter), not something else
    response, sent_sha256, seconds = await asyncio.wait_for(upload(stack.proxy_port, TOTAL // MIB),
                                                            TRANSFER_TIMEOUT_S)
    peak = peak_rss_kb(stack.proxy_pid)
    print(f"upload 1 GiB: {seconds:.1f} s ({TOTAL / MIB / seconds:.0f} MiB/s), "
          f"proxy VmHWM {before} kB before, {peak} kB after")
    assert response.status == 200, response.body_prefix[:500]
    echo = json.loads(response.body_prefix)
    assert echo["principal"] == PRINCIPAL and echo["protocol"] == "HTTP/2"  # signed, over h2c
    assert echo["body_length"] == TOTAL
    assert echo["body_sha256"] == sent_sha256
    assert peak < RSS_LIMIT_KB, f"proxy peak RSS {peak} kB (was {before} kB before the upload)"


async def test_1gib_download_streams_with_bounded_proxy_memory(stack):
    before = peak_rss_kb(stack.proxy_pid)
    expected = await asyncio.to_thread(expected_pattern_sha256, TOTAL)
    response, seconds = await asyncio.wait_for(download(stack.proxy_port, TOTAL), TRANSFER_TIMEOUT_S)
    peak = peak_rss_kb(stack.proxy_pid)
    print(f"download 1 GiB: {seconds:.1f} s ({TOTAL / MIB / seconds:.0f} MiB/s), "
          f"proxy VmHWM {before} kB before, {peak} kB after")
    assert response.status == 200, response.body_prefix[:500]
    assert response.body_length == TOTAL
    assert response.body_sha256 == expected
    assert response.headers["x-sim-body-sha256"] == expected
    assert response.body_prefix[:512] == PATTERN_BLOCK[:512]
    assert peak < RSS_LIMIT_KB, f"proxy peak RSS {peak} kB (was {before} kB before the download)"

