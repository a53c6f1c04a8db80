"""The EKS and ECS manifests: valid against the real schemas (Kubernetes' OpenAPI schemas of every
minor version from 1.29 to the newest that kubernetes-validate ships, strict: no unknown field;
ECS's RegisterTaskDefinition input model in botocore, with botocore's own parameter validator),
and in agreement with each other, with the Dockerfile and with the code: one pinned image, ports
8080/9901, uid 101, probe paths, the iptables init step, drain times and the serve flags, env and
config keys they use."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from support.deploy_files import (
    ADMIN_PORT,
    PROXY_PORT,
    PROXY_UID,
    ROOT,
    exec_form,
    final,
    flag,
    flags,
    healthcheck_argv,
    hostport,
    listens,
)

EKS = ROOT / "config" / "eks"
ECS = ROOT / "config" / "ecs"
LOADTEST = ROOT / "config" / "loadtest"  # locust's master and workers for a cluster run
DEFAULT_DRAIN_TIMEOUT = 20.0


# --- the manifests ---

def eks_documents(directory: pathlib.Path = EKS) -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(directory.glob("*.yaml")):
        with path.open() as fh:
            docs[path.name] = [d for d in yaml.safe_load_all(fh) if d is not None]
    return docs


def kubernetes_documents() -> dict[str, list[dict]]:
    """Every Kubernetes manifest we ship: config/eks and config/loadtest."""
    return {f"{d.name}/{name}": docs for d in (EKS, LOADTEST) for name, docs in eks_documents(d).items()}


def ecs_task() -> dict:
    return json.loads((ECS / "task-definition.json").read_text())


def _workloads() -> dict[str, dict]:
    """file -> pod spec, for every Deployment and Job."""
    specs = {}
    for name, docs in eks_documents().items():
        for doc in docs:
            if doc["kind"] in ("Deployment", "Job"):
                specs[f"{name}:{doc['kind']}"] = doc["spec"]["template"]["spec"]
    return specs


def _sidecar(pod: dict) -> dict:
    native = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert len(native) == 1, "exactly one native sidecar (init container, restartPolicy: Always)"
    return native[0]


def _iptables_inits(pod: dict) -> list[dict]:
    """The init containers that run `sigv4proxy iptables` (one, or one per address family)."""
    inits = [c for c in pod.get("initContainers", []) if (c.get("args") or [None])[0] == "iptables"]
    assert inits, "no iptables init container"
    return inits


def _loopback_listens(argv: list[str]) -> None:
    """Every --listen is the proxy port on a loopback address (127.0.0.1, [::1], ...)."""
    listens = flags(argv, "--listen")
    assert listens, "no --listen"
    for value in listens:
        host, port = hostport(value)
        assert ipaddress.ip_address(host.strip("[]")).is_loopback and port == PROXY_PORT, value


def _configmap() -> dict:
    (cm,) = [d for d in eks_documents()["configmap.yaml"] if d["kind"] == "ConfigMap"]
    return cm


def _sidecar_settings() -> dict:
    return yaml.safe_load(_configmap()["data"]["sidecar.yaml"])


def _drain_timeout(env: dict[str, str]) -> float:
    return float(env.get("SIGV4PROXY_DRAIN_TIMEOUT", _sidecar_settings().get("drain_timeout",
                                                                             DEFAULT_DRAIN_TIMEOUT)))


# --- the real schemas ---

MIN_KUBERNETES = (1, 29)  # native sidecars (init containers with restartPolicy: Always) are beta


def kubernetes_versions() -> list[str]:
    """Every minor version from 1.29 to the newest whose schemas kubernetes-validate ships."""
    from kubernetes_validate.utils import all_versions

    minors = {tuple(int(p) for p in v.split(".")[:2]) for v in all_versions()}
    return [f"{major}.{minor}" for major, minor in sorted(minors) if (major, minor) >= MIN_KUBERNETES]


def kubernetes_errors(doc: dict, version: str) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
        return f"{getattr(exc, 'message', exc)}"
    return None


def test_kubernetes_schemas_cover_1_29_to_the_newest():
    versions = kubernetes_versions()
    assert versions[0] == "1.29" and len(versions) >= 2, versions


@pytest.mark.parametrize("version", kubernetes_versions())
def test_eks_manifests_valid_against_kubernetes_schemas(version):
    for name, docs in kubernetes_documents().items():
        for doc in docs:
            error = kubernetes_errors(doc, version)
            assert error is None, f"{name} {doc['kind']}/{doc['metadata']['name']} on {version}: {error}"


def test_schema_validation_catches_a_typo_and_a_wrong_type():
    """The validation is not vacuous: a misspelt field and a string port fail on every version."""
    (deployment,) = [d for d in eks_documents()["deployment.yaml"] if d["kind"] == "Deployment"]
    typo, wrong_type = copy.deepcopy(deployment), copy.deepcopy(deployment)
    _sidecar(typo["spec"]["template"]["spec"])["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 9901}}
    _sidecar(wrong_type["spec"]["template"]["spec"])["ports"][0]["containerPort"] = "8080"
    for version in kubernetes_versions():
        assert kubernetes_errors(typo, version), version
        assert kubernetes_errors(wrong_type, version), version


def ecs_errors(task: dict) -> str:
    import botocore.session
    import botocore.validate

    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = botocore.validate.ParamValidator().validate(task, shape)
    return report.generate_report() if report.has_errors() else ""


def test_ecs_task_definition_valid_against_botocores_model():
    assert ecs_errors(ecs_task()) == ""


def test_ecs_validation_catches_an_unknown_key_and_a_wrong_type():
    unknown, wrong_type = ecs_task(), ecs_task()
    unknown["containerDefinitions"][0]["healthcheck"] = unknown["containerDefinitions"][0]["healthCheck"]
    wrong_type["containerDefinitions"][0]["portMappings"][0]["containerPort"] = "8080"
    assert "Unknown parameter" in ecs_errors(unknown)
    assert "Invalid type" in ecs_errors(wrong_type)


# --- what the schemas cannot say: the files agree ---

def test_every_manifest_is_there_with_the_task_shape_we_ship():
    docs = eks_documents()
    assert {"deployment.yaml", "job.yaml", "configmap.yaml"} <= set(docs)
    for name, items in docs.items():
        assert items, f"{name} is empty"
    assert set(_workloads()) == {"deployment.yaml:Deployment", "job.yaml:Job"}
    task = ecs_task()
    for key in ("taskRoleArn", "networkMode", "requiresCompatibilities"):  # optional in the model
        assert task.get(key), key
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", task["taskRoleArn"])
    assert task["networkMode"] == "awsvpc" and "FARGATE" in task["requiresCompatibilities"]


def _all_proxy_images() -> list[str]:
    images = []
    for pod in _workloads().values():
        images += [_sidecar(pod)["image"], *(c["image"] for c in _iptables_inits(pod))]
    images.append(_ecs_container("sigv4proxy")["image"])
    for doc in eks_documents(LOADTEST)["locust.yaml"]:
        if doc["kind"] == "Deployment":
            images.append(_sidecar(doc["spec"]["template"]["spec"])["image"])
    return images


def test_one_pinned_image_matching_the_package_version():
    images = set(_all_proxy_images())
    assert len(images) == 1, images
    image = images.pop()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    repository, _, tag = image.rpartition(":")
    assert repository.endswith("/sigv4proxy") and tag == version


@pytest.mark.parametrize("workload", ["deployment.yaml:Deployment", "job.yaml:Job"])
def test_pod_shape(workload):
    pod = _workloads()[workload]
    inits = pod["initContainers"]
    sidecar = _sidecar(pod)
    assert pod.get("serviceAccountName")

    # iptables init: root with NET_ADMIN, rules pointing at the proxy's port and uid.
    for iptables in _iptables_inits(pod):
        assert inits.index(iptables) < inits.index(sidecar), "redirect must exist before the proxy starts"
        assert iptables["args"][:2] == ["iptables", "--apply"]
        assert "restartPolicy" not in iptables
        assert iptables["securityContext"]["runAsUser"] == 0
        assert "NET_ADMIN" in iptables["securityContext"]["capabilities"]["add"]
        assert int(flag(iptables["args"], "--proxy-port", "8080")) == PROXY_PORT
        assert int(flag(iptables["args"], "--proxy-uid", "101")) == PROXY_UID

    # sidecar: uid 101, locked down, loopback proxy, admin for probes, transparent mode.
    sc = sidecar["securityContext"]
    assert sc["runAsUser"] == PROXY_UID and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(sidecar["resources"][kind])
    args = sidecar["args"]
    assert args[0] == "serve" and "--transparent" in args
    _loopback_listens(args)
    assert listens(args) == [("127.0.0.1", PROXY_PORT), ("[::1]", PROXY_PORT)]  # where REDIRECT lands
    assert hostport(flag(args, "--admin")) == ("0.0.0.0", ADMIN_PORT)
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert set(ports.values()) == {PROXY_PORT, ADMIN_PORT}
    env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
    assert env.get("SIGV4PROXY_REGION")

    def probe(name: str) -> tuple[str, int]:
        get = sidecar[name]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("startupProbe") == ("/readyz", ADMIN_PORT)
    assert probe("readinessProbe") == ("/readyz", ADMIN_PORT)
    assert probe("livenessProbe") == ("/healthz", ADMIN_PORT)
    assert pod["terminationGracePeriodSeconds"] > _drain_timeout(env)

    # The config file the sidecar reads is the ConfigMap's sidecar.yaml.
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (cm_volume,) = [n for n in mounts if "configMap" in volumes[n]]
    assert volumes[cm_volume]["configMap"]["name"] == _configmap()["metadata"]["name"]
    assert flag(args, "--config") == mounts[cm_volume].rstrip("/") + "/sidecar.yaml"

    # Apps: no HTTP_PROXY (the redirect is transparent), plain http:// to Lattice, not uid 101.
    for app in pod["containers"]:
        names = {e["name"].lower() for e in app.get("env", [])}
        assert not names & {"http_proxy", "https_proxy", "all_proxy"}
        assert app.get("securityContext", {}).get("runAsUser") != PROXY_UID
        text = json.dumps(app)
        assert "https://" not in text or "vpc-lattice-svcs" not in text
        assert "http://" in text and "vpc-lattice-svcs" in text


@pytest.mark.parametrize("workload", ["deployment.yaml:Deployment", "job.yaml:Job"])
def test_the_init_step_redirects_both_lattice_ranges_to_the_proxy(workload):
    # What its arguments print without --apply: both families, into the port the sidecar listens on.
    (init,) = _iptables_inits(_workloads()[workload])
    argv = [a for a in init["args"] if a != "--apply"]
    script = subprocess.run([sys.executable, "-m", "sigv4proxy", *argv], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    for tool, cidr in (("iptables", "169.254.171.0/24"), ("ip6tables", "fd00:ec2:80::/64")):
        rules = [line.strip().partition(" || ")[2] for line in script.stdout.splitlines()
                 if line.strip().startswith(f"{tool} -t nat -C ")]
        assert f"{tool} -t nat -A SIGV4PROXY_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN" in rules
        for port in (80, 443):
            assert (f"{tool} -t nat -A SIGV4PROXY_OUTPUT -p tcp -d {cidr} --dport {port} -j REDIRECT "
                    f"--to-ports {PROXY_PORT}") in rules


def test_job_completes_with_the_native_sidecar():
    (job,) = [d for d in eks_documents()["job.yaml"] if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert all(c.get("restartPolicy") is None for c in pod["containers"])
    _sidecar(pod)


def test_deployment_ships_its_service_account():
    docs = eks_documents()["deployment.yaml"]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert _workloads()["deployment.yaml:Deployment"]["serviceAccountName"] in accounts


def _ecs_container(name: str) -> dict:
    (container,) = [c for c in ecs_task()["containerDefinitions"] if c["name"] == name]
    return container


def test_ecs_task_definition():
    proxy = _ecs_container("sigv4proxy")
    assert proxy["essential"] is True and proxy["user"] == str(PROXY_UID)
    assert {m["containerPort"] for m in proxy["portMappings"]} == {PROXY_PORT, ADMIN_PORT}
    assert proxy["healthCheck"]["command"] == ["CMD", *healthcheck_argv()]
    command = proxy["command"]
    assert command[0] == "serve"
    _loopback_listens(command)
    assert listens(command) == [("127.0.0.1", PROXY_PORT), ("[::1]", PROXY_PORT)]
    assert hostport(flag(command, "--admin"))[1] == ADMIN_PORT
    env = {e["name"]: e["value"] for e in proxy["environment"]}
    assert env.get("SIGV4PROXY_REGION")
    assert proxy["stopTimeout"] > _drain_timeout(env)
    apps = [c for c in ecs_task()["containerDefinitions"] if c["name"] != "sigv4proxy"]
    assert apps
    for app in apps:
        assert {"containerName": "sigv4proxy", "condition": "HEALTHY"} in app["dependsOn"]
        assert app.get("user") != str(PROXY_UID)
        app_env = {e["name"]: e["value"] for e in app.get("environment", [])}
        assert hostport(app_env["HTTP_PROXY"].removeprefix("http://")) == ("127.0.0.1", PROXY_PORT)
        assert "169.254.170.2" in app_env["NO_PROXY"].split(","), "ECS credentials must bypass the proxy"
    for container in ecs_task()["containerDefinitions"]:
        logging = container["logConfiguration"]
        assert logging["logDriver"] == "awslogs"
        assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(logging["options"])


# --- the serve flags the manifests use exist (once `serve` is registered) ---

def _serve_invocations() -> dict[str, tuple[list[str], dict[str, str]]]:
    """where -> (argv after the entrypoint, SIGV4PROXY_* env)."""
    out = {}
    for where, pod in _workloads().items():
        sidecar = _sidecar(pod)
        out[where] = (sidecar["args"], {e["name"]: e["value"] for e in sidecar.get("env", [])})
    proxy = _ecs_container("sigv4proxy")
    out["ecs"] = (proxy["command"], {e["name"]: e["value"] for e in proxy["environment"]})
    (cmd,) = final("CMD")
    out["Dockerfile CMD"] = (exec_form(cmd.args), {})
    return out


def _subcommands() -> dict:
    from sigv4proxy.tools.cli import build_parser

    actions = [a for a in build_parser()._actions if getattr(a, "dest", None) == "command"]
    return dict(actions[0].choices or {}) if actions else {}


def test_serve_flags_env_and_config_keys_exist(tmp_path):
    commands = _subcommands()
    assert "serve" in commands and "check-config" in commands  # the manifests call both
    from sigv4proxy.tools.cli import build_parser

    serve_dests = {a.dest for a in commands["serve"]._actions}
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(_configmap()["data"]["sidecar.yaml"])
    for key in _sidecar_settings():
        assert key.replace("-", "_") in serve_dests, f"configmap key {key!r} is not a serve setting"
    for where, (argv, env) in _serve_invocations().items():
        if "--config" in argv:
            argv = list(argv)
            argv[argv.index("--config") + 1] = str(config_file)
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `sigv4proxy {shlex.join(argv)}` does not parse")
        for name in env:
            assert name.startswith("SIGV4PROXY_")
            assert name.removeprefix("SIGV4PROXY_").lower() in serve_dests, f"{where}: {name}"
        clean_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("SIGV4PROXY_", "AWS_"))}
        result = subprocess.run(
            [sys.executable, "-m", "sigv4proxy", "check-config", *argv[1:]],
            capture_output=True, text=True, timeout=60, env={**clean_env, **env})
        assert result.returncode == 0, f"{where}: {result.stderr[-1000:]}"
        effective = yaml.safe_load(result.stdout)
        assert {hostport(address)[1] for address in effective["listen"]} == {PROXY_PORT}
        assert hostport(effective["admin"])[1] == ADMIN_PORT
        assert effective["transparent"] is ("--transparent" in argv)
