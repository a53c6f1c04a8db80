"""No secret anywhere: a representative session at debug log level, scanned for the secret key,
the session token, the derived signing key and every signature the upstreams received.

Scanned: the JSON log lines of every logger (ours, the access log, and the root logger with
botocore/h2/hpack under it), the error body of every error kind, `/metrics`, `/readyz`, the
simulator's access log and records, `sigv4proxy call --explain` output, and the reprs/strs of
config, credential store, snapshot, signer, routes and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time

import aiohttp
import h2.errors
import pytest
from support.creds_server import CredsServer, isolate_aws_env
from support.proxy import (
    ACCESS_KEY,
    LATTICE_HOST,
    SECRET_KEY,
    SERVICE_ARN,
    SESSION_TOKEN,
    running_proxy,
    watch_upstream,
    write_identities,
)
from support.secrets_scan import SecretScanner, capture_logs, signing_key_hex
from support.upstream_servers import SilentServer, dead_port
from test_faults_upstream import Exchange, ScriptedH2Upstream, echo, get, raw_request

from sigv4proxy.tools.call import call
from sigv4proxy.aws.credentials import CredentialStore, RefreshPolicy
from sigv4proxy.aws.signing import Credentials
from sigv4proxy.sim.server import SimConfig, start_simulator

H = LATTICE_HOST.encode()


async def capture_script(ex: Exchange) -> None:
    if ex.path.endswith("/reset"):
        ex.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
    elif ex.path.endswith("/malformed"):
        ex.conn.writer.write(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00oops")
    else:
        await echo(ex)


def record_upstream_headers(proxy, scanner: SecretScanner) -> list[int]:
    """Every Authorization the proxy sends upstream registers its signature with the scanner."""
    counted: list[int] = []

    def seen(origin, method, target, authority, headers, body):
        for name, value in headers:
            if name.lower() == b"authorization":
                counted.append(scanner.add_signatures_from(value))
            if name.lower() == b"x-amz-security-token":
                scanner.add_secret("session token on the wire", value)

    watch_upstream(proxy, seen)
    return counted


class ExpiredProvider:
    """Hands out our keys already expired: the store must refuse them, and say so safely."""

    def fetch(self) -> Credentials:
        return Credentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, time.time() - 1)


async def fetch_text(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return await resp.text()


async def test_a_representative_session_leaks_no_secret(tmp_path, monkeypatch):
    scanner = SecretScanner()
    scanner.add_secret("secret key", SECRET_KEY)
    scanner.add_secret("session token", SESSION_TOKEN)
    today = time.strftime("%Y%m%d", time.gmtime())
    scanner.add_secret("signing key", signing_key_hex(SECRET_KEY, today, "us-west-2", "vpc-lattice-svcs"))
    sim_log = io.StringIO()
    sim = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=str(write_identities(tmp_path)),
                                          policy=None, service_arn=SERVICE_ARN, access_log=sim_log))
    silent = SilentServer()
    routes = [
        {"path_prefix": "/cap/", "upstream": "", "protocol": "h2", "sign_host": LATTICE_HOST},
        {"path_prefix": "/dead/", "upstream": f"http://127.0.0.1:{dead_port()}", "protocol": "h2",
         "sign_host": LATTICE_HOST},
    ]
    signed: list[int] = []
    try:
        with capture_logs("debug") as logs:
            async with ScriptedH2Upstream(capture_script) as peer, silent:
                routes[0]["upstream"] = peer.url
                routes.append({"path_prefix": "/silent/", "upstream": f"http://127.0.0.1:{silent.port}",
                               "protocol": "http1", "sign_host": LATTICE_HOST})
                async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                                         route=routes, max_body_size=4096, access_log=True,
                                         first_byte_timeout=0.5) as proxy:
                    signed = record_upstream_headers(proxy, scanner)
                    requests = [
                        get("/ok?X-Amz-Signature=client-supplied"),  # verified by the simulator
                        b"POST /ok HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\nhello" % H,
                        get("/forged", b"Authorization: AWS4-HMAC-SHA256 Signature=" + b"f" * 64 + b"\r\n"),
                        get("/cap/echo"), get("/cap/reset"), get("/cap/malformed"),
                        get("/dead/x"), get("/silent/x"),
                        b"GARBAGE\r\n\r\n",  # bad_request (parser)
                        get("/big", b"X-Big: " + b"a" * 20000 + b"\r\n"),  # headers_too_large
                        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",  # host_not_allowed
                        b"CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n\r\n" % (H, H),  # method_not_supported
                        b"POST /big HTTP/1.1\r\nHost: %s\r\nContent-Length: 5000\r\n\r\n" % H + b"x" * 5000,
                    ]
                    kinds = set()
                    for request in requests:
                        resp = await raw_request(proxy.port, request)
                        kinds.add(resp.header("x-sigv4proxy-error") or str(resp.status))
                        scanner.add_text(f"response to {request[:30]!r}", repr(resp))
                    scanner.add_text("/metrics", await fetch_text(f"http://127.0.0.1:{proxy.admin_port}/metrics"))
                    scanner.add_text("/readyz", await fetch_text(f"http://127.0.0.1:{proxy.admin_port}/readyz"))
                    for obj in (proxy.config, proxy.credentials, proxy.credentials.snapshot(), proxy.router,
                                proxy.handler, proxy.pool, proxy.router.resolve(LATTICE_HOST, "/"),
                                proxy.router.resolve(LATTICE_HOST, "/").signer):
                        scanner.add_text(f"repr {type(obj).__name__}", repr(obj))
                        scanner.add_text(f"str {type(obj).__name__}", str(obj))
                    scanner.add_text("config.redacted()", json.dumps(proxy.config.redacted(), default=str))
                    assert peer.log.requests  # the capture upstream did see signed requests
            # Overloaded and credentials_unavailable come from proxies of their own.
            async with running_proxy(upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2",
                                     max_inflight=1) as busy:
                answers = await asyncio.gather(*(raw_request(busy.port, get("/slow", b"x-sim-delay-ms: 300\r\n"))
                                                 for _ in range(4)))
                kinds.update(a.header("x-sigv4proxy-error") or str(a.status) for a in answers)
                scanner.add_text("overloaded bodies", repr(answers))
            expired = CredentialStore(ExpiredProvider(), refresh_policy=RefreshPolicy(backoff_initial=30))
            async with running_proxy(credentials=expired, upstream=f"http://127.0.0.1:{sim.port}",
                                     upstream_protocol="h2") as closed:
                resp = await raw_request(closed.port, get("/nocreds"))
                kinds.add(resp.header("x-sigv4proxy-error"))
                scanner.add_text("credentials_unavailable body", repr(resp))
                scanner.add_text("readyz expired", await fetch_text(f"http://127.0.0.1:{closed.admin_port}/readyz"))
                scanner.add_text("repr expired store", repr(expired))
            # `sigv4proxy call --explain` with the same keys from the environment.
            isolate_aws_env(monkeypatch, tmp_path)
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
            out = io.StringIO()
            args = argparse.Namespace(url=f"http://{LATTICE_HOST}/explain?a=1", method=None, header=None,
                                      data="body", explain=True,
                                      upstream=f"http://127.0.0.1:{sim.port}", upstream_protocol="h2")
            assert await call(args, out=out) == 0
            scanner.add_text("call --explain", out.getvalue())
            assert "Canonical request" in out.getvalue()
    finally:
        await sim.aclose()
    scanner.add_text("sim access log", sim_log.getvalue())
    scanner.add_text("sim records", json.dumps(list(sim.records)))
    text = logs.getvalue()
    scanner.add_text("logs", text)
    assert '"level": "debug"' in text and '"logger": "sigv4proxy.access"' in text  # debug really on
    assert sum(signed) >= 6  # signatures of the simulator's and the capture peer's requests
    assert {"bad_request", "headers_too_large", "host_not_allowed", "method_not_supported",
            "payload_too_large", "upstream_connect", "upstream_timeout", "upstream_reset",
            "upstream_protocol", "overloaded", "credentials_unavailable", "200"} <= kinds, kinds
    scanner.assert_clean()


async def test_botocore_refresh_at_debug_leaks_no_issued_key(tmp_path, monkeypatch):
    isolate_aws_env(monkeypatch, tmp_path)
    scanner = SecretScanner()
    with capture_logs("debug") as logs:
        async with CredsServer(lifetime=3.0) as creds, ScriptedH2Upstream(echo) as peer:
            creds.apply_env(monkeypatch)
            store = CredentialStore.from_botocore(
                refresh_policy=RefreshPolicy(lead=1.0, min_delay=0.05, backoff_initial=0.2, backoff_max=1.0))
            async with running_proxy(credentials=store, upstream=peer.url, upstream_protocol="h2") as proxy:
                record_upstream_headers(proxy, scanner)
                for _ in range(30):  # ~3 s: at least one rotation
                    resp = await raw_request(proxy.port, get("/r"))
                    assert resp.status == 200
                    if store.refresh_success >= 2:
                        break
                    await asyncio.sleep(0.1)
                assert store.refresh_success >= 2
                scanner.add_text("repr store", repr(store))
                scanner.add_text("/metrics", await fetch_text(f"http://127.0.0.1:{proxy.admin_port}/metrics"))
            for key in creds.issued:
                scanner.add_secret("issued secret key", key.secret_key)
                scanner.add_secret("issued session token", key.token)
            scanner.add_secret("container authorization token", creds.token)
    scanner.add_text("logs", logs.getvalue())
    assert "credentials refreshed" in logs.getvalue()
    scanner.assert_clean()


def test_scanner_finds_what_it_should():
    scanner = SecretScanner()
    scanner.add_secret("secret key", SECRET_KEY)
    assert scanner.add_signatures_from("AWS4-HMAC-SHA256 Credential=x, Signature=" + "ab" * 32) == 1
    scanner.add_text("clean", "nothing to see")
    scanner.add_text("leaky log", f'{{"msg": "oops {SECRET_KEY}"}}')
    scanner.add_text("upper-case hex", "sig " + "AB" * 32)
    hits = scanner.hits()
    assert [(h.source, h.label) for h in hits] == [("leaky log", "secret key"), ("upper-case hex", "signature")]
    assert all(SECRET_KEY not in h.excerpt for h in hits)
    with pytest.raises(AssertionError):
        scanner.assert_clean()
