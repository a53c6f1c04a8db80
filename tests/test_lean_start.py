"""What keeps `serve` lean at start (the figures are make bench-start's and make image's, not
asserted here): the supervisor of `--workers 2` loads no data plane, each worker's credential
child is gone once it answered, and aiohttp imported without CA loading leaves its unused client
contexts failing closed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from support.polling import eventually_sync

# Extension modules that only the data plane loads: their shared objects show in a process's maps.
DATA_PLANE_LIBRARIES = ("uvloop/loop.", "aiohttp/_http_parser.", "multidict/_multidict.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def test_supervisor_loads_no_data_plane_and_workers_no_botocore(tmp_path):
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIGV4PROXY_"))}
    env.update(AWS_ACCESS_KEY_ID="AKIDLEANSTART0000001", AWS_SECRET_ACCESS_KEY="lean-start-secret",
               AWS_REGION="us-west-2", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.Popen([sys.executable, "-m", "sigv4proxy", "serve", "--listen", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}", "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def workers_ready() -> bool:
            workers = children(proc.pid)
            return len(workers) == 2 and all("uvloop/loop." in mapped(w) for w in workers)

        assert eventually_sync(workers_ready, timeout=60), "two workers serving"
        supervisor = mapped(proc.pid)
        assert not [lib for lib in DATA_PLANE_LIBRARIES if lib in supervisor]
        # Each worker's botocore ran in a child that is gone once it answered
        # (test_credentials.py: the serving store never imports botocore).
        def credential_children() -> list[int]:
            return [p for w in children(proc.pid) for p in children(w)]

        assert eventually_sync(lambda: not credential_children(), timeout=30), credential_children()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


CONTEXTS = """
import ssl
from sigv4proxy.compat.aiohttp_import import import_without_client_trust
import_without_client_trust()
from aiohttp import connector
verified = connector._SSL_CONTEXT_VERIFIED
print(verified.verify_mode == ssl.CERT_REQUIRED, verified.check_hostname,
      verified.cert_store_stats()["x509_ca"], "set_default_verify_paths" in vars(ssl.SSLContext),
      ssl.create_default_context().cert_store_stats()["x509_ca"] > 0)
"""


def test_aiohttps_unused_client_contexts_fail_closed_and_ssl_is_restored():
    out = subprocess.run([sys.executable, "-c", CONTEXTS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    required, hostname, anchors, still_patched, later_contexts_trust = out.stdout.split()
    assert (required, hostname, anchors) == ("True", "True", "0")  # verifies, trusts nothing
    assert (still_patched, later_contexts_trust) == ("False", "True")  # ours load the CA bundle
