"""Drop-in compatibility with the Go aws-sigv4-proxy's flags."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from sigv4proxy.tools import go_flags
from sigv4proxy import config as cfg
from sigv4proxy.aws.routing import Router
from sigv4proxy.sim.server import SimConfig, start_simulator
from support.proxy import ACCESS_KEY, PRINCIPAL, SECRET_KEY, SERVICE_ARN, SESSION_TOKEN, write_identities

ADMISSION_LINE = ["--name", "vpc-lattice-svcs", "--region", "us-west-2", "--host", "HOST",
                  "--port", ":8005", "--upstream-url-scheme", "http", "--unsigned-payload"]


def test_translation_of_every_flag():
    flags = go_flags.translate([
        "-v", "--log-failed-requests", "--unsigned-payload", "--port", ":9000", "-s", "X-A", "--strip", "x-b",
        "--custom-headers", "x-team=pay,x-env=prod", "--duplicate-headers", "Authorization", "--role-arn",
        "arn:aws:iam::1:role/r", "--name", "execute-api", "--sign-host", "api.example.com", "--host",
        "internal.example.com:8443", "--region", "eu-west-1", "--upstream-url-scheme", "https", "--no-verify-ssl",
        "--transport.idle-conn-timeout", "1m30s",
    ])
    c = cfg.from_sources(flags, env={}, file_data={})
    assert c.listen_addrs == (("0.0.0.0", 9000), ("::", 9000))  # as Go's ":9000": both families
    assert c.service == "execute-api" and c.region == "eu-west-1" and c.role_arn == "arn:aws:iam::1:role/r"
    assert c.strip_header == ("X-A", "x-b") and c.add_header == ("x-team=pay", "x-env=prod")
    assert c.duplicate_header == ("Authorization",) and c.verify_tls is False
    assert c.log_level == "debug" and c.access_log is True and c.idle_timeout == 90.0
    (route,) = c.route
    assert route.upstream == "https://internal.example.com:8443" and route.sign_host == "api.example.com"
    # --host fixes the target: whatever Host the app sends, it goes to the configured host.
    target = Router(c).resolve("anything.example.org", "/x")
    assert (target.origin.host, target.origin.port, target.authority) == ("internal.example.com", 8443, "api.example.com")


@pytest.mark.parametrize("bad", [["--transport.idle-conn-timeout", "forever"], ["--upstream-url-scheme", "ftp"]])
def test_bad_go_flags_are_rejected(bad):
    with pytest.raises(SystemExit):
        go_flags.translate(bad)


def test_go_duration():
    assert go_flags._duration("40s") == 40 and go_flags._duration("500ms") == 0.5 and go_flags._duration("2h1m") == 7260


async def test_admission_controller_argument_line_runs_unchanged(tmp_path):
    sim = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)),
                                          policy=None, service_arn=SERVICE_ARN))
    argv = [a.replace("HOST", f"127.0.0.1:{sim.port}") for a in ADMISSION_LINE]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_SESSION_TOKEN=SESSION_TOKEN, SIGV4PROXY_ADMIN="127.0.0.1:0", AWS_EC2_METADATA_DISABLED="true")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sigv4proxy", *argv, env=env,
                                                stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as client:
            while True:
                try:
                    async with client.get("http://127.0.0.1:8005/compat?x=1", headers={"Host": "app.local"}) as resp:
                        body = await resp.read()
                        break
                except aiohttp.ClientConnectionError:
                    assert proc.returncode is None, "proxy exited early"
                    assert time.monotonic() < deadline, "proxy did not start"
                    await asyncio.sleep(0.2)
        assert resp.status == 200, body
        echo = json.loads(body)
        assert echo["principal"] == PRINCIPAL and echo["authority"] == f"127.0.0.1:{sim.port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        await sim.aclose()
    assert proc.returncode == 0, err[-2000:]
    assert SECRET_KEY.encode() not in err and SESSION_TOKEN.encode() not in err
