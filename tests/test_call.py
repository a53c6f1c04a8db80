"""`sigv4proxy call` as a user runs it: a subprocess with credentials from the environment (the
demo identity), against the Lattice simulator (which re-verifies SigV4 and applies the demo auth
policy) or a capture server on loopback. Checks the printed status/headers/body, exit codes,
`--explain` (checked against the signature that really arrived), and clear errors for bad input.
Also the user guide's way (docs/guide.md, "Path escaping") to find the path escaping a service
takes: one request with `%20` in its path, both ways, against `sigv4proxy sim --uri-path-escaping`
run as a user runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import sys
from dataclasses import dataclass

import pytest

from sigv4proxy.sim.server import SimConfig, start_simulator

DEMO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "sigv4proxy", "demo")
IDENTITIES = os.path.join(DEMO_DIR, "identities.json")
POLICY = os.path.join(DEMO_DIR, "auth-policy.json")
SERVICE_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123456789abcdef0"
HOST = "demo-svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
RUN_TIMEOUT_S = 30


def _demo_identity() -> dict:
    with open(IDENTITIES, encoding="utf-8") as fh:
        return json.load(fh)["identities"][0]


IDENTITY = _demo_identity()
SECRET = IDENTITY["secret_access_key"]
TOKEN = IDENTITY["session_token"]


@dataclass
class CallResult:
    code: int
    stdout: str
    stderr: str

    @property
    def head(self) -> list[str]:
        """Status line, header lines and the timing comment (everything before the blank line)."""
        return self.stdout.split("\n\n", 1)[0].splitlines()

    @property
    def body(self) -> str:
        return self.stdout.split("\n\n", 1)[1]

    def header(self, name: str) -> list[str]:
        prefix = name.lower() + ": "
        return [line[len(prefix):] for line in self.head[1:] if line.lower().startswith(prefix)]


def call_env(tmp_path, *, credentials: bool = True) -> dict[str, str]:
    """The ambient environment minus every AWS/proxy setting, plus the demo keys (optionally)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HOME=str(tmp_path), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_EC2_METADATA_DISABLED="true")
    if credentials:
        env.update(AWS_ACCESS_KEY_ID=IDENTITY["access_key_id"], AWS_SECRET_ACCESS_KEY=SECRET,
                   AWS_SESSION_TOKEN=TOKEN)
    return env


async def run_call(env: dict[str, str], *args: str) -> CallResult:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigv4proxy", "call", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    result = CallResult(proc.returncode, out.decode(), err.decode())
    # Whatever happened, no secret reaches the terminal.
    for secret in (SECRET, TOKEN):
        assert secret not in result.stdout and secret not in result.stderr
    return result


@pytest.fixture
async def sim():
    server = await start_simulator(SimConfig(host="127.0.0.1", port=0, identities=IDENTITIES, policy=POLICY,
                                             service_arn=SERVICE_ARN))
    yield server
    await server.aclose()


@pytest.fixture
def env(tmp_path):
    return call_env(tmp_path)


def via(sim, protocol: str = "h2") -> list[str]:
    return ["--upstream", f"http://127.0.0.1:{sim.port}", "--upstream-protocol", protocol]


# --- against the simulator ---

@pytest.mark.parametrize("protocol, version", [("h2", "HTTP/2"), ("http1", "HTTP/1.1")])
async def test_get_prints_status_headers_and_the_verified_body(sim, env, protocol, version):
    result = await run_call(env, f"http://{HOST}/hello?b=2&a=1", *via(sim, protocol))
    assert result.code == 0, result.stderr
    assert result.head[0] == f"{version} 200"
    assert result.header("content-type") == ["application/json"]
    assert result.header("x-amzn-lattice-identity")[0].startswith(f"Principal={IDENTITY['principal']}")
    assert re.fullmatch(r"# first byte \d+\.\d ms, total \d+\.\d ms", result.head[-1])
    echo = json.loads(result.body)
    assert echo["principal"] == IDENTITY["principal"]  # the simulator verified the signature
    assert echo["protocol"] == version and echo["method"] == "GET"
    assert echo["authority"] == HOST and echo["path"] == "/hello" and echo["query"] == "b=2&a=1"
    assert "x-amz-security-token" in echo["signed_headers"]
    assert result.stderr == ""


@pytest.mark.parametrize("protocol", ["h2", "http1"])
async def test_post_with_data_and_headers(sim, env, protocol):
    body = "hello from sigv4proxy call \u20ac"
    result = await run_call(env, f"http://{HOST}/orders", "-d", body, "-H", "X-Trace: abc 123",
                            "-H", "Content-Type: text/plain", *via(sim, protocol))
    assert result.code == 0, result.stderr
    assert result.head[0].endswith(" 200")
    echo = json.loads(result.body)
    assert echo["method"] == "POST"  # -d without -X means POST, as curl does
    assert echo["body_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert echo["body_length"] == len(body.encode())
    received = {name: value for name, value in echo["headers"]}
    assert received["x-trace"] == "abc 123" and received["content-type"] == "text/plain"


async def test_explicit_method_with_data(sim, env):
    result = await run_call(env, f"http://{HOST}/orders/7", "-X", "PUT", "-d", "{}", *via(sim))
    assert result.code == 0, result.stderr
    echo = json.loads(result.body)
    assert echo["method"] == "PUT" and echo["body_length"] == 2


async def test_policy_denial_exits_1_and_prints_the_403(sim, env):
    result = await run_call(env, f"http://{HOST}/admin/users/7", "-X", "DELETE", *via(sim))
    assert result.code == 1
    assert result.head[0] == "HTTP/2 403"
    assert result.header("x-amzn-errortype") == ["AccessDeniedException"]
    message = json.loads(result.body)["Message"]
    assert "explicit deny" in message and IDENTITY["principal"] in message
    # The same identity is allowed elsewhere: the 403 is the policy, not the signature.
    allowed = await run_call(env, f"http://{HOST}/admin/users/7", *via(sim))
    assert allowed.code == 0, allowed.stdout


async def test_simulator_status_hook_4xx_and_5xx_exit_1(sim, env):
    for status in ("404", "503"):
        result = await run_call(env, f"http://{HOST}/s", "-H", f"x-sim-status: {status}", *via(sim))
        assert result.code == 1
        assert result.head[0] == f"HTTP/2 {status}"


async def test_missing_credentials_is_a_clear_error(sim, tmp_path):
    result = await run_call(call_env(tmp_path, credentials=False), f"http://{HOST}/x", *via(sim))
    assert result.code == 1
    assert "credentials_unavailable" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sim.records == []  # nothing was sent unsigned


# --- --explain, checked against what was really signed ---

class CaptureServer:
    """HTTP/1.1 on 127.0.0.1: records each request head and answers 204."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "CaptureServer":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            self.heads.append(head)
            writer.write(b"HTTP/1.1 204 No Content\r\nx-capture: yes\r\nconnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def expected_signature(secret: str, string_to_sign: str) -> str:
    """SigV4 signature from the published key-derivation steps (independent of our signer)."""
    scope = string_to_sign.split("\n")[2]
    date, region, service, _ = scope.split("/")
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), date), region), service), "aws4_request")
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


async def test_explain_prints_what_was_signed_without_secrets(env):
    async with CaptureServer() as capture:
        result = await run_call(env, f"http://{HOST}/explain/a%20b?z=1&a=2", "-H", "X-Trace: t1",
                                "--upstream", f"http://127.0.0.1:{capture.port}", "--upstream-protocol",
                                "http1", "--explain")
    assert result.code == 0, result.stderr
    assert len(capture.heads) == 1
    authorization = re.search(rb"\r\nauthorization: ([^\r]+)", capture.heads[0], re.I).group(1).decode()
    signature = authorization.rsplit("Signature=", 1)[1]
    date = re.search(rb"\r\nx-amz-date: (\d{8}T\d{6}Z)", capture.heads[0], re.I).group(1).decode()

    text = result.stdout
    canonical = text.split("Canonical request:\n", 1)[1].split("\n\nString to sign:\n", 1)[0]
    string_to_sign = text.split("String to sign:\n", 1)[1].split("\n\n", 1)[0]
    lines = canonical.split("\n")
    assert lines[0] == "GET" and lines[1] == "/explain/a%2520b" and lines[2] == "a=2&z=1"
    assert f"host:{HOST}" in lines and "x-amz-security-token:<redacted session token>" in lines
    assert lines[-1] == "UNSIGNED-PAYLOAD"
    scope = f"{date[:8]}/us-west-2/vpc-lattice-svcs/aws4_request"
    assert string_to_sign.split("\n")[:3] == ["AWS4-HMAC-SHA256", date, scope]
    # The printed canonical request (token restored) hashes to the printed string to sign, and
    # the printed string to sign is exactly what produced the signature that arrived.
    restored = canonical.replace("<redacted session token>", TOKEN)
    assert string_to_sign.split("\n")[3] == hashlib.sha256(restored.encode()).hexdigest()
    assert expected_signature(SECRET, string_to_sign) == signature
    # Never the secret, the token (checked by run_call) or the signature itself.
    assert signature not in text and signature not in result.stderr
    assert "Signature=" not in text
    assert f"Credential scope: {scope}" in text
    assert "HTTP/1.1 204" in text and "x-capture: yes" in text


# --- which path escaping does the service take? One request with %20 in its path, both ways ---

@contextlib.asynccontextmanager
async def sim_command(*args: str):
    """`sigv4proxy sim` as a subprocess on an ephemeral port: yields the port."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigv4proxy", "sim", "--listen", "127.0.0.1:0", "--identities",
        IDENTITIES, "--policy", POLICY, "--service-arn", SERVICE_ARN, *args,
        stderr=asyncio.subprocess.PIPE)
    try:
        banner = await asyncio.wait_for(proc.stderr.readline(), RUN_TIMEOUT_S)
        match = re.search(rb"http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        yield int(match.group(1))
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)


def status_line(result: CallResult) -> str:
    return next(line for line in result.stdout.splitlines() if re.fullmatch(r"HTTP/\S+ \d{3}", line))


PROBE_URIS = {"double": "/probe/a%2520b", "single": "/probe/a%20b"}


@pytest.mark.parametrize("service", ["double", "single"])
async def test_a_percent_20_request_both_ways_shows_which_escaping_the_service_takes(env, service):
    async with sim_command("--uri-path-escaping", service) as port:
        upstream = ["--upstream", f"http://127.0.0.1:{port}", "--upstream-protocol", "h2"]
        results = {mode: await run_call(env, f"http://{HOST}/probe/a%20b", "--explain",
                                        "--uri-path-escaping", mode, *upstream)
                   for mode in ("double", "single")}
        plain = await run_call(env, f"http://{HOST}/probe/plain", "--explain", *upstream)
    for mode, result in results.items():
        other = "single" if mode == "double" else "double"
        text = result.stdout
        # --explain names both canonical URIs and the one signed, which is the request's.
        assert f"Canonical URI with --uri-path-escaping {mode}: {PROBE_URIS[mode]}  <- signed\n" in text
        assert f"Canonical URI with --uri-path-escaping {other}: {PROBE_URIS[other]}\n" in text
        assert text.split("Canonical request:\n", 1)[1].split("\n")[1] == PROBE_URIS[mode]
        if mode == service:
            assert (result.code, status_line(result)) == (0, "HTTP/2 200"), result
            assert json.loads(text.rsplit("\n\n", 1)[1])["path"] == "/probe/a%20b"
        else:
            assert (result.code, status_line(result)) == (1, "HTTP/2 403"), result
            assert "x-amzn-errortype: InvalidSignatureException" in text
            assert f"try --uri-path-escaping {other}" in text
    # A plain path signs the same both ways: the default (double) passes everywhere.
    assert plain.code == 0 and status_line(plain) == "HTTP/2 200", plain
    assert "Canonical URI: /probe/plain (the same with --uri-path-escaping double or single)" in plain.stdout


# --- errors ---

def _refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again: nothing listens there


async def test_unreachable_upstream_is_a_clear_error(env):
    port = _refused_port()
    result = await run_call(env, f"http://127.0.0.1:{port}/x", "--region", "us-west-2")
    assert result.code == 1
    assert "upstream_connect" in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


async def test_upstream_hanging_up_is_a_clear_error(env):
    async def hang_up(reader, writer):
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await run_call(env, f"http://{HOST}/x", "--upstream", f"http://127.0.0.1:{port}",
                                "--upstream-protocol", "http1")
    finally:
        server.close()
        await server.wait_closed()
    assert result.code == 1
    assert result.stderr.startswith("sigv4proxy call: upstream") and "Traceback" not in result.stderr


@pytest.mark.parametrize("url", [
    "ftp://example.on.aws/x",
    "http:///no-host",
    "not a url",
    "http://[::1/x",
    "http://h.example:99999/x",
    "http://h.example:port/x",
    "http://h.example/a b",
    "http://h_x.example/",
])
async def test_bad_url_exits_2(env, url):
    result = await run_call(env, url, "--region", "us-west-2")
    assert result.code == 2, result
    assert result.stderr.startswith("sigv4proxy call: ") and "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_bad_header_argument_exits_2(env):
    result = await run_call(env, f"http://{HOST}/x", "-H", "no-colon-here")
    assert result.code == 2
    assert "Name: value" in result.stderr and "Traceback" not in result.stderr
