"""The local upstream for `make bench`: nginx (HTTP/1.1 + h2c) or the built-in Python fallback.

Owns: finding or installing Debian tools (nginx with njs, wrk, h2load), rendering
benchmarks/nginx.conf.tmpl into a private prefix, and starting the upstream; also rendering
benchmarks/nginx-proxy.conf.tmpl, nginx as a plain reverse proxy in front of it (the
`nginx-proxy` target). It must never listen on anything but 127.0.0.1, never touch the system
nginx (own prefix, own pid file, own config) and never install anything unless running as root
with installs allowed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench_procs import HarnessError, ManagedProcess, free_port, http_probe, wait_until

HERE = Path(__file__).resolve().parent
NGINX_TEMPLATE = HERE / "nginx.conf.tmpl"
NGINX_PROXY_TEMPLATE = HERE / "nginx-proxy.conf.tmpl"
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
# njs reads the whole request body before answering: `return` would discard it, and over h2
# nginx then resets big uploads mid-stream (measured: 1 MiB h2c POSTs failed), so POSTs go here.
NJS_REPLY = "function reply(r) { r.return(200, r.variables.bench_body); }\nexport default { reply };\n"

_apt_updated = False


def ensure_debian_packages(binary: str, packages: list[str], allow_install: bool,
                           extra_file: Path | None = None) -> bool:
    """True when `binary` (and `extra_file`) exist, installing `packages` with apt when allowed."""
    global _apt_updated

    def present() -> bool:
        return shutil.which(binary) is not None and (extra_file is None or extra_file.exists())

    if present():
        return True
    if not allow_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    print(f"bench: installing {' '.join(packages)} with apt-get", file=sys.stderr)
    for attempt in range(2):
        result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                timeout=600, check=False)
        if result.returncode == 0 or _apt_updated:
            break
        _apt_updated = True  # package lists may be missing on a fresh machine: update once
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600, check=False)
    return present()


@dataclass
class Upstream:
    kind: str  # "nginx" or "python-fallback"
    h1_port: int
    h2c_port: int
    process: ManagedProcess
    h2tls_port: int = 0  # h2 over TLS (nginx only; 0: none)
    ca_file: str = ""  # the CA that signed its certificate (for --ca-bundle)

    @property
    def h1_url(self) -> str:
        return f"http://127.0.0.1:{self.h1_port}"

    @property
    def h2c_url(self) -> str:
        return f"http://127.0.0.1:{self.h2c_port}"

    @property
    def h2tls_url(self) -> str:
        return f"https://127.0.0.1:{self.h2tls_port}"


def render_template(template: Path, values: dict[str, str]) -> str:
    """`template` with each @NAME@ replaced; an @NAME@ left outside comments is an error."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    unknown = re.findall(r"@[A-Z0-9_]+@", code)
    if unknown:
        raise HarnessError(f"{template.name} has unknown placeholders: {sorted(set(unknown))}")
    return text


def _user_line() -> str:
    return "user root;" if os.geteuid() == 0 else ""


def render_nginx_conf(prefix: Path, h1_port: int, h2c_port: int, body: str, workers: int,
                      h2tls_port: int = 0, cert: Path | None = None, key: Path | None = None) -> str:
    """The template with our prefix, ports and body; `user root` only when we are root; an h2
    over TLS listener when given a port and a certificate."""
    tls_listen = ""
    if h2tls_port and cert and key:
        tls_listen = (f"listen 127.0.0.1:{h2tls_port} ssl http2;\n"
                      f"        ssl_certificate {cert};\n        ssl_certificate_key {key};")
    return render_template(NGINX_TEMPLATE, {
        "@USER_LINE@": _user_line(),
        "@NJS_MODULE@": str(NJS_MODULE),
        "@NJS_SCRIPT@": str(prefix / "bench_reply.js"),
        "@WORKERS@": str(workers),
        "@PREFIX@": str(prefix),
        "@H1_PORT@": str(h1_port),
        "@H2C_PORT@": str(h2c_port),
        "@BODY@": body,
        "@TLS_LISTEN@": tls_listen,
    })


def render_nginx_proxy_conf(prefix: Path, port: int, upstream_port: int, workers: int) -> str:
    return render_template(NGINX_PROXY_TEMPLATE, {
        "@USER_LINE@": _user_line(), "@WORKERS@": str(workers), "@PREFIX@": str(prefix),
        "@PORT@": str(port), "@UPSTREAM_PORT@": str(upstream_port)})


def nginx_proxy_argv(prefix: Path, upstream_port: int, workers: int, port: int) -> list[str]:
    """Writes the `nginx-proxy` config for `port` into `prefix`; the command that runs it."""
    for sub in NGINX_TEMP_DIRS:
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_proxy_conf(prefix, port, upstream_port, workers))
    return ["nginx", "-p", str(prefix), "-c", str(conf)]


def _wait_ready(process: ManagedProcess, h1_port: int, h2c_port: int) -> None:
    wait_until(lambda: http_probe(h1_port, "/ready") == 200, process, 15, process.name)
    wait_until(lambda: http_probe(h1_port, "/ready", method="POST", body=b"x" * 4096) == 200,
               process, 5, process.name)
    _ = h2c_port  # h2c is checked by the direct-h2c preflight (http.client speaks only HTTP/1.1)


def start_nginx(workdir: Path, body_bytes: int, workers: int) -> Upstream:
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in NGINX_TEMP_DIRS:
        (prefix / sub).mkdir(exist_ok=True)
    (prefix / "bench_reply.js").write_text(NJS_REPLY)
    h1_port, h2c_port = free_port(), free_port()
    tls = tls_material(prefix)
    h2tls_port = free_port() if tls else 0
    cert, key, ca = tls or (None, None, None)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(prefix, h1_port, h2c_port, "x" * body_bytes, workers,
                                      h2tls_port, cert, key))
    process = ManagedProcess("nginx", ["nginx", "-p", str(prefix), "-c", str(conf)],
                             workdir / "logs" / "nginx.log").start()
    try:
        _wait_ready(process, h1_port, h2c_port)
    except BaseException:
        process.stop()
        raise
    return Upstream("nginx", h1_port, h2c_port, process, h2tls_port, str(ca or ""))


def tls_material(prefix: Path) -> tuple[Path, Path, Path] | None:
    """A throwaway CA and a certificate for 127.0.0.1 (trustme, a dev dependency), or None."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = prefix / "tls-cert.pem", prefix / "tls-key.pem", prefix / "tls-ca.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


def start_fallback(workdir: Path, body_bytes: int) -> Upstream:
    h1_port, h2c_port = free_port(), free_port()
    argv = [sys.executable, str(HERE / "upstream_fallback.py"), "--h1-port", str(h1_port),
            "--h2c-port", str(h2c_port), "--body-bytes", str(body_bytes)]
    process = ManagedProcess("python-fallback upstream", argv,
                             workdir / "logs" / "upstream_fallback.log").start()
    try:
        _wait_ready(process, h1_port, h2c_port)
    except BaseException:
        process.stop()
        raise
    return Upstream("python-fallback", h1_port, h2c_port, process)


def start_upstream(workdir: Path, allow_install: bool, force_fallback: bool,
                   body_bytes: int = 64, nginx_workers: int = 1) -> Upstream:
    """nginx when it can be had (installed if allowed), else the Python fallback."""
    if not force_fallback and ensure_debian_packages(
            "nginx", ["nginx", "libnginx-mod-http-js"], allow_install, NJS_MODULE):
        try:
            return start_nginx(workdir, body_bytes, nginx_workers)
        except HarnessError as exc:
            print(f"bench: nginx failed ({exc}); using the Python fallback", file=sys.stderr)
    return start_fallback(workdir, body_bytes)
