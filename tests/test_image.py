"""The container image, built with a real engine and run: uid 101 on a read-only root, the
HEALTHCHECK, signatures verified by the simulator in a second container of the same image (200
through the proxy, 403 straight to it), a SIGTERM drain, pod-like transparent mode (the iptables
init step with NET_ADMIN, then the proxy in the same network namespace), no secret in `docker
logs`, and every credential provider of botocore's chain resolving inside the image (its botocore
models are cut down: scripts/trim_botocore.py).

The image is built once per run through scripts/image.py, on the engine that runs or on a
`dockerd` started for the module (no bridge, no iptables rules of its own, stopped by its PID at
the end), on the official base when it can be pulled, else on one made from Debian packages.
Containers use the host's network on loopback ports, except the transparent-mode pod and its
Lattice stand-in: each has a network namespace of its own (`--network none`), joined by a veth
made inside them, so no rule or address ever touches the host's namespace. Without an engine (not
root, no docker.io) the module skips saying why.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.compiled import compiled_modules, is_extension
from support.creds_server import ThreadedCredsServer
from support.polling import eventually_sync
from support.proxy import ACCESS_KEY, LATTICE_HOST, PRINCIPAL, SECRET_KEY, SESSION_TOKEN, write_identities
from support.secrets_scan import SecretScanner, signing_key_hex
from support.upstream_servers import H1TestServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import image as image_tool  # noqa: E402
from trim_botocore import KEEP_SERVICES  # noqa: E402

pytestmark = pytest.mark.timeout(900)  # the first test also pays for the build (cold: ~2 min)

TAG = "sigv4proxy:test"
PROXY_UID = 101
RUN_ID = uuid.uuid4().hex[:8]
LABEL = f"sigv4proxy-test={RUN_ID}"
CREDS_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
             "AWS_SESSION_TOKEN": SESSION_TOKEN, "AWS_REGION": "us-west-2",
             "AWS_EC2_METADATA_DISABLED": "true"}
LATTICE_IP, POD_IP = "169.254.171.5", "169.254.171.1"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Docker:
    """The engine for this module: runs containers labelled with this run's id, keeps every log
    it read (for the secrets scan), removes them all at the end."""

    def __init__(self, engine: image_tool.Engine) -> None:
        self.engine = engine
        self.logs: list[tuple[str, str]] = []

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return self.engine.docker(*args, timeout=timeout, check=check)

    def run(self, *args: str, name: str | None = None) -> str:
        """`docker run -d` with this module's label; returns the container's name."""
        name = name or f"sigv4proxy-test-{uuid.uuid4().hex[:8]}"
        self("run", "-d", "--name", name, "--label", LABEL, *args)
        return name

    def oneshot(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`docker run --rm` in the foreground; stdout and stderr returned, exit code not checked."""
        return self("run", "--rm", "--label", LABEL, *args, timeout=timeout, check=False)

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "-f", template, name).stdout.strip()

    def collect_logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        text = result.stdout + result.stderr
        self.logs.append((f"docker logs {name}", text))
        return text

    def remove_all(self) -> None:
        names = self("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
        if names:
            self("rm", "-f", *names, check=False)


@pytest.fixture(scope="module")
def docker():
    if sys.platform != "linux":
        pytest.skip("the image tests need Linux and a container engine")
    try:
        with image_tool.running_engine() as engine:
            client = Docker(engine)
            try:
                yield client
            finally:
                client.remove_all()
    except image_tool.EngineUnavailable as exc:
        pytest.skip(f"no container engine: {exc}")


@pytest.fixture(scope="module")
def image(docker) -> str:
    try:
        base = image_tool.choose_base(docker.engine, "auto")
    except image_tool.EngineUnavailable as exc:
        pytest.skip(f"no base image can be had: {exc}")
    image_tool.build(docker.engine, base, tags=(TAG,))
    return TAG


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> pathlib.Path:
    """Mounted read-only into containers: the simulator's identities."""
    directory = tmp_path_factory.mktemp("image-config")
    write_identities(directory)
    directory.chmod(0o755)
    (directory / "identities.json").chmod(0o644)
    return directory


def env_flags(env: dict[str, str]) -> list[str]:
    return [f for name, value in env.items() for f in ("-e", f"{name}={value}")]


def readyz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def request(port: int, path: str = "/hello", headers: dict[str, str] | None = None,
            timeout: float = 15) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": LATTICE_HOST, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_sim(docker: Docker, image: str, config_dir: pathlib.Path) -> int:
    port = free_port()
    docker.run("--network", "host", "--read-only", "-v", f"{config_dir}:/config:ro",
               image, "sim", "--listen", f"127.0.0.1:{port}", "--identities", "/config/identities.json")
    assert eventually_sync(lambda: _listening(port), timeout=30), "simulator container listening"
    return port


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_proxy(docker: Docker, image: str, upstream: str, *extra: str) -> tuple[str, int, int]:
    """A proxy container on the host's network, read-only root; (name, port, admin port) once ready."""
    port, admin = free_port(), free_port()
    name = docker.run("--network", "host", "--read-only", *env_flags(CREDS_ENV), image, "serve",
                      "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                      "--upstream", upstream, "--upstream-protocol", "http1",
                      "--log-level", "debug", "--access-log", *extra)
    assert eventually_sync(lambda: readyz(admin) == 200, timeout=30), "proxy container ready"
    return name, port, admin


# --- the image as users run it ---

def test_image_is_built_and_small_enough_to_report(docker, image):
    size = int(docker.inspect(image, "{{.Size}}"))
    assert 0 < size < 400e6, size  # the README states the measured size; this catches a bloat
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "pip_cert" not in docker.inspect(image, "{{json .Config.Env}}")
    assert "build-essential" not in history


def test_proxy_runs_as_uid_101_on_a_read_only_root_and_signs_for_the_simulator(docker, image, config_dir):
    sim_port = start_sim(docker, image, config_dir)
    name, port, _admin = start_proxy(docker, image, f"http://127.0.0.1:{sim_port}")
    assert docker.inspect(name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    pid = docker.inspect(name, "{{.State.Pid}}")
    uids = next(line for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(PROXY_UID)}, uids  # real, effective, saved and filesystem uid

    status, body = request(port)
    assert status == 200, body[:300]
    echo = json.loads(body)
    assert echo["principal"] == PRINCIPAL  # the simulator recomputed the signature and knew the key
    assert "x-amz-security-token" in echo["signed_headers"]
    direct_status, direct_body = request(sim_port)
    assert direct_status == 403 and b"AccessDeniedException" in direct_body
    docker.collect_logs(name)


def test_healthcheck_turns_healthy(docker, image):
    """The image's own HEALTHCHECK (127.0.0.1:9901 in the container's namespace: a namespace of
    its own here, so the fixed port is free), run every second instead of every ten."""
    name = docker.run("--network", "none", "--read-only", "--health-interval", "1s",
                      *env_flags(CREDS_ENV), image)
    assert eventually_sync(lambda: docker.inspect(name, "{{.State.Health.Status}}") == "healthy",
                           timeout=60), "HEALTHCHECK healthy"
    log = json.loads(docker.inspect(name, "{{json .State.Health.Log}}"))
    assert log and log[-1]["ExitCode"] == 0
    docker.collect_logs(name)


def test_sigterm_drains_in_flight_requests_and_exits_0(docker, image, config_dir):
    sim_port = start_sim(docker, image, config_dir)
    name, port, admin = start_proxy(docker, image, f"http://127.0.0.1:{sim_port}", "--drain-timeout", "10")
    in_flight = 3
    with ThreadPoolExecutor(in_flight) as pool:
        answers = [pool.submit(request, port, "/slow", {"x-sim-delay-ms": "2500"}) for _ in range(in_flight)]
        assert eventually_sync(lambda: _inflight(admin) == in_flight, timeout=10), "requests in flight"
        began = time.monotonic()
        docker("kill", "--signal", "TERM", name)
        results = [a.result(timeout=30) for a in answers]
    assert [status for status, _ in results] == [200] * in_flight
    assert eventually_sync(lambda: docker.inspect(name, "{{.State.Running}}") == "false", timeout=30), \
        "container exited"
    assert time.monotonic() - began < 10
    assert docker.inspect(name, "{{.State.ExitCode}}") == "0"
    assert "draining" in docker.collect_logs(name)


def _inflight(admin: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
    try:
        conn.request("GET", "/metrics")
        for line in conn.getresponse().read().decode().splitlines():
            if line.startswith("sigv4proxy_requests_inflight"):
                return int(float(line.split()[-1]))
    except OSError:
        pass
    finally:
        conn.close()
    return -1


# --- transparent mode, as in a pod ---

def _nsenter(pid: str, *argv: str) -> None:
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True, capture_output=True,
                   timeout=30)


APP_REQUEST = (
    "import http.client, sys; c = http.client.HTTPConnection(sys.argv[1], 80, timeout=15); "
    "c.request('GET', '/orders', headers={'Host': sys.argv[2]}); r = c.getresponse(); "
    "print(r.status); print(r.read().decode())")


def test_transparent_mode_in_a_pod_namespace(docker, image, config_dir):
    if not shutil.which("nsenter") or not shutil.which("ip"):
        pytest.skip("needs nsenter (util-linux) and ip (iproute2) to join the two namespaces")
    # The Lattice stand-in and the pod: a network namespace each, one veth between them.
    lattice = docker.run("--network", "none", "--read-only", "-v", f"{config_dir}:/config:ro",
                         "--sysctl", "net.ipv4.ip_unprivileged_port_start=80", image, "sim",
                         "--listen", "0.0.0.0:80", "--identities", "/config/identities.json")
    pod = docker.run("--network", "none", "--read-only", "--entrypoint", "sleep", image, "600")
    lattice_pid, pod_pid = docker.inspect(lattice, "{{.State.Pid}}"), docker.inspect(pod, "{{.State.Pid}}")
    _nsenter(pod_pid, "ip", "link", "add", "pod0", "type", "veth", "peer", "name", "lat0",
             "netns", lattice_pid)
    _nsenter(pod_pid, "ip", "addr", "add", f"{POD_IP}/24", "dev", "pod0")
    _nsenter(pod_pid, "ip", "link", "set", "pod0", "up")
    _nsenter(lattice_pid, "ip", "addr", "add", f"{LATTICE_IP}/24", "dev", "lat0")
    _nsenter(lattice_pid, "ip", "link", "set", "lat0", "up")

    # The init step: root with NET_ADMIN in the pod's namespace, as config/eks runs it.
    init = docker.oneshot("--network", f"container:{pod}", "--cap-add", "NET_ADMIN", "--user", "0",
                          image, "iptables", "--apply")
    assert init.returncode == 0, init.stderr[-1000:]
    proxy = docker.run("--network", f"container:{pod}", "--read-only", *env_flags(CREDS_ENV), image,
                       "serve", "--transparent", "--listen", "0.0.0.0:8080", "--admin", "127.0.0.1:9901",
                       "--log-level", "debug")
    probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9901/readyz').status)"
    assert eventually_sync(lambda: docker("exec", proxy, "python", "-c", probe, check=False).stdout.strip()
                           == "200", timeout=30), "transparent proxy ready"

    # The app (any uid but 101) calls the Lattice address in plain HTTP: redirected and signed.
    app = docker.oneshot("--network", f"container:{pod}", "--user", "4242", "--entrypoint", "python",
                         image, "-c", APP_REQUEST, LATTICE_IP, LATTICE_HOST)
    status, _, body = app.stdout.partition("\n")
    assert status == "200", app.stdout[-500:] + app.stderr[-500:]
    assert json.loads(body)["principal"] == PRINCIPAL
    # uid 101 is exempt (the proxy's own traffic): the same call goes straight there, unsigned.
    direct = docker.oneshot("--network", f"container:{pod}", "--user", str(PROXY_UID), "--entrypoint",
                            "python", image, "-c", APP_REQUEST, LATTICE_IP, LATTICE_HOST)
    assert direct.stdout.partition("\n")[0] == "403", direct.stdout[-500:] + direct.stderr[-500:]
    docker.collect_logs(proxy)


# --- secrets ---

async def test_no_secret_in_docker_logs(docker, image):
    """One run whose signature is captured by an upstream on the host, and every other container
    log this module read before (debug level, access log on), scanned for the secret key, session
    token, the day's signing key and the signatures."""
    import asyncio

    async with H1TestServer() as upstream:
        name, port, _admin = await asyncio.to_thread(start_proxy, docker, image,
                                                     f"http://127.0.0.1:{upstream.port}")
        status, _body = await asyncio.to_thread(request, port, "/secret-scan")
        assert status == 200
        await asyncio.to_thread(docker, "stop", "-t", "10", name)
        await asyncio.to_thread(docker.collect_logs, name)
    scanner = SecretScanner()
    scanner.add_secret("secret key", SECRET_KEY)
    scanner.add_secret("session token", SESSION_TOKEN)
    today = datetime.datetime.now(datetime.timezone.utc)
    for day in (today, today - datetime.timedelta(days=1)):
        scanner.add_secret("signing key", signing_key_hex(SECRET_KEY, day.strftime("%Y%m%d"),
                                                          "us-west-2", "vpc-lattice-svcs"))
    authorizations = [v for r in upstream.stats.requests for n, v in r["headers"] if n.lower() == "authorization"]
    assert sum(scanner.add_signatures_from(a) for a in authorizations) == 1
    for source, text in docker.logs:
        assert text.strip(), f"{source} is empty: nothing to scan"
        scanner.add_text(source, text)
    scanner.assert_clean()


# --- botocore's credential chain inside the image (its models are trimmed) ---

PROBE = """
import json
import botocore.session
from sigv4proxy.aws.credential_sources import BotocoreProvider
found = botocore.session.Session().get_credentials()
creds = BotocoreProvider(role_arn={role_arn!r}, region="us-west-2").fetch()
print(json.dumps({{"method": found.method, "access_key": creds.access_key,
                  "has_token": creds.token is not None}}))
"""


class SsoPortal(http.server.BaseHTTPRequestHandler):
    """IAM Identity Center's GetRoleCredentials, as botocore's SSO provider calls it."""

    token = "sso-access-token-" + uuid.uuid4().hex
    access_key = "ASIASSOPORTAL" + uuid.uuid4().hex[:7].upper()

    def do_GET(self):
        ok = (self.path.startswith("/federation/credentials")
              and self.headers.get("x-amz-sso_bearer_token") == self.token)
        body = json.dumps({"roleCredentials": {
            "accessKeyId": self.access_key, "secretAccessKey": "sso-secret-" + uuid.uuid4().hex,
            "sessionToken": "sso-token-" + uuid.uuid4().hex,
            "expiration": int((time.time() + 3600) * 1000)}} if ok else {"message": "denied"}).encode()
        self.send_response(200 if ok else 403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stand_ins():
    """Loopback endpoints the providers call: STS and IMDS (moto), the container credentials
    endpoint (support.creds_server), an SSO portal. The containers reach them on the host's
    network."""
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    sso = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SsoPortal)
    threading.Thread(target=sso.serve_forever, daemon=True).start()
    with ThreadedCredsServer(lifetime=900) as creds:
        host, port = moto.get_host_and_port()
        yield {"sts": f"http://{host}:{port}", "creds": creds, "sso": f"http://127.0.0.1:{sso.server_address[1]}"}
    sso.shutdown()
    sso.server_close()
    moto.stop()


def _aws_files(directory: pathlib.Path, start_url: str) -> None:
    """Shared files for the profile-based providers; the SSO token cache under HOME."""
    (directory / "credentials").write_text(
        "[default]\naws_access_key_id = AKIDSHAREDFILE000001\naws_secret_access_key = shared-secret\n"
        "[base]\naws_access_key_id = AKIDSOURCEPROFILE001\naws_secret_access_key = source-secret\n")
    (directory / "process.py").write_text(
        "import json; print(json.dumps({'Version': 1, 'AccessKeyId': 'AKIDCREDPROCESS00001', "
        "'SecretAccessKey': 'process-secret', 'SessionToken': 'process-token'}))\n")
    (directory / "config").write_text(
        "[profile config-keys]\naws_access_key_id = AKIDCONFIGFILE000001\naws_secret_access_key = config-secret\n"
        "[profile process]\ncredential_process = python /aws/process.py\n"
        "[profile assume]\nrole_arn = arn:aws:iam::123456789012:role/from-profile\nsource_profile = base\n"
        f"[profile sso]\nsso_start_url = {start_url}\nsso_region = us-west-2\n"
        "sso_account_id = 123456789012\nsso_role_name = lattice-caller\nregion = us-west-2\n")
    cache = directory / "home" / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True)
    expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
    (cache / (hashlib.sha1(start_url.encode()).hexdigest() + ".json")).write_text(json.dumps({
        "startUrl": start_url, "region": "us-west-2", "accessToken": SsoPortal.token,
        "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    (directory / "token").write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2ln")
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    directory.chmod(0o755)


PROVIDERS = {
    # name: (env, expected botocore method, access key or a prefix it must start with, role_arn)
    "env": ({"AWS_ACCESS_KEY_ID": "AKIDENVIRONMENT00001", "AWS_SECRET_ACCESS_KEY": "env-secret"},
            "env", "AKIDENVIRONMENT00001", None),
    "shared-credentials-file": ({}, "shared-credentials-file", "AKIDSHAREDFILE000001", None),
    "config-file": ({"AWS_PROFILE": "config-keys"}, "config-file", "AKIDCONFIGFILE000001", None),
    "credential-process": ({"AWS_PROFILE": "process"}, "custom-process", "AKIDCREDPROCESS00001", None),
    "assume-role-profile": ({"AWS_PROFILE": "assume"}, "assume-role", "ASIA", None),
    "web-identity": ({"AWS_WEB_IDENTITY_TOKEN_FILE": "/aws/token",
                      "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/irsa"},
                     "assume-role-with-web-identity", "ASIA", None),
    "sso": ({"AWS_PROFILE": "sso"}, "sso", SsoPortal.access_key, None),
    "container": (None, "container-role", None, None),
    "imds": (None, "iam-role", "test-key", None),
    "role-arn-on-env": ({"AWS_ACCESS_KEY_ID": "AKIDENVIRONMENT00001", "AWS_SECRET_ACCESS_KEY": "env-secret"},
                        "env", "ASIA", "arn:aws:iam::123456789012:role/lattice-caller"),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_every_credential_provider_resolves_inside_the_image(docker, image, stand_ins, tmp_path, provider):
    env, method, expected_key, role_arn = PROVIDERS[provider]
    start_url = "https://sigv4proxy-test.awsapps.com/start"
    _aws_files(tmp_path, start_url)
    base_env = {"AWS_SHARED_CREDENTIALS_FILE": "/aws/credentials", "AWS_CONFIG_FILE": "/aws/config",
                "HOME": "/aws/home", "AWS_DEFAULT_REGION": "us-west-2", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_ENDPOINT_URL_STS": stand_ins["sts"], "AWS_ENDPOINT_URL_SSO": stand_ins["sso"]}
    if provider == "container":
        creds = stand_ins["creds"]
        env = creds.env()
        expected_key = None
    elif provider == "imds":
        env = {"AWS_EC2_METADATA_DISABLED": "false",
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": stand_ins["sts"] + "/",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    if provider != "shared-credentials-file" and provider not in ("config-file", "credential-process",
                                                                     "assume-role-profile", "sso"):
        base_env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"  # the default profile must not answer first
    result = docker.oneshot("--network", "host", "--read-only", "-v", f"{tmp_path}:/aws:ro",
                            *env_flags({**base_env, **env}), "--entrypoint", "python", image, "-c",
                            PROBE.format(role_arn=role_arn))
    assert result.returncode == 0, result.stderr[-1500:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["method"] == method
    if provider == "container":
        assert stand_ins["creds"].is_issued(found["access_key"])
    else:
        assert found["access_key"].startswith(expected_key), found


def test_the_image_runs_the_compiled_build_without_its_compiler(docker, image):
    """setup.py's hot modules are C extensions in the image (the proxy that signs for the simulator
    above is that build); mypy, which compiled them, stayed in the builder."""
    probe = ("import importlib, importlib.util, sys; "
             "print(importlib.util.find_spec('mypy') is None); "
             "[print(importlib.import_module(m).__file__) for m in sys.argv[1:]]")
    listing = docker.oneshot("--entrypoint", "python", image, "-c", probe, *compiled_modules())
    assert listing.returncode == 0, listing.stderr
    no_mypy, *files = listing.stdout.split()
    assert no_mypy == "True", "mypy left in the image"
    assert len(files) == len(compiled_modules()) and all(is_extension(f) for f in files), files


def test_trimmed_botocore_keeps_only_the_credential_models(docker, image):
    listing = docker.oneshot("--entrypoint", "python", image, "-c",
                             "import botocore, os; d = os.path.join(os.path.dirname(botocore.__file__), 'data'); "
                             "print(' '.join(sorted(e.name for e in os.scandir(d) if e.is_dir())))")
    assert listing.returncode == 0, listing.stderr
    assert set(listing.stdout.split()) == KEEP_SERVICES
