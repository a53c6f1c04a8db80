# sigv4proxy: SigV4 signing sidecar for Amazon VPC Lattice.
#   docker build -t sigv4proxy:0.1.0 .          (or `make image`, which also reports size and start)
# PYTHON_IMAGE: a Debian bookworm image with python3 and its venv module. By default the official
# slim Python image; where no registry is reachable, `make image` builds one from Debian's
# packages (scripts/make-base.sh) and passes it here: the same steps below serve both.
# The same image runs the proxy (uid 101) and, as root with NET_ADMIN, the transparent-mode
# iptables init step (`sigv4proxy iptables --apply`), whose rules exempt uid 101's own traffic.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: the package, its hot modules compiled (setup.py), and its dependencies (wheels) ----
FROM ${PYTHON_IMAGE} AS builder
# binutils: `strip` for the wheels' debug info (uvloop's 14 MB library is 2 MB without it). gcc,
# libc6-dev and Python's headers (a Debian-made base lacks them: python3-dev): the compiled build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils gcc libc6-dev \
 && { python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
      || apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from pyproject alone: a change to the code does not fetch them again.
# A TLS-inspecting proxy's CA for the package index: `--secret id=pip_cert,src=FILE` (builder only;
# it never reaches the image). The pip cache is the builder's too.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert,required=false --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -m venv /opt/sigv4proxy \
 && python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
 && /opt/sigv4proxy/bin/pip install --disable-pip-version-check --only-binary=:all: \
      -r requirements.txt "$(python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])")" \
      "$(python3 -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev'] if d.startswith('mypy')))")"
COPY README.md setup.py ./
COPY sigv4proxy ./sigv4proxy
COPY scripts/trim_botocore.py ./scripts/
# pip, setuptools and mypy (the compiler) leave the venv once it is built (the proxy never runs
# them); botocore keeps only the models its credential providers use (29 MB -> 1 MB); shared
# libraries lose their debug info (20 MB; never loaded into memory).
RUN SIGV4PROXY_COMPILE=1 /opt/sigv4proxy/bin/pip install --disable-pip-version-check --no-index --no-deps \
      --no-build-isolation . \
 && /opt/sigv4proxy/bin/python scripts/trim_botocore.py \
 && /opt/sigv4proxy/bin/pip uninstall --disable-pip-version-check -y -q mypy mypy_extensions pathspec librt ast-serialize \
 && /opt/sigv4proxy/bin/pip uninstall --disable-pip-version-check -y -q pip setuptools \
 && find /opt/sigv4proxy -name '*.so' -exec strip --strip-debug {} +

# ---- runtime: the base, iptables and the venv; nothing else ----
FROM ${PYTHON_IMAGE} AS runtime
# iptables: for the init container that installs the transparent-mode redirect (same image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 101 sigv4proxy \
 && useradd --system --uid 101 --gid 101 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sigv4proxy
COPY --from=builder /opt/sigv4proxy /opt/sigv4proxy
# PATH in full: an imported base image has none to extend.
ENV PATH=/opt/sigv4proxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 101:101
# 8080: the proxy (apps talk plain HTTP here); 9901: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9901
# slim has no curl: stdlib only. Exits 0 only on HTTP 200 from the admin port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["sigv4proxy"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901"]
