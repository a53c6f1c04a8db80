# syntax=docker/dockerfile:1
# sigv4proxy: SigV4 signing sidecar for Amazon VPC Lattice.
#   docker build -t sigv4proxy:0.1.0 .
# The same image runs the proxy (uid 101) and, as root with NET_ADMIN, the transparent-mode
# iptables init step (`sigv4proxy iptables --apply`), whose rules exempt uid 101's own traffic.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: compilers live here only; produces wheels for us and every dependency ----
FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sigv4proxy ./sigv4proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: no build tools; wheels installed offline ----
FROM ${PYTHON_IMAGE} AS runtime
# iptables: for the init container that installs the transparent-mode redirect (same image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 101 sigv4proxy \
 && useradd --system --uid 101 --gid 101 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sigv4proxy
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels sigv4proxy
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 101:101
# 8080: the proxy (apps talk plain HTTP here); 9901: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9901
# slim has no curl: stdlib only. Exits 0 only on HTTP 200 from the admin port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["sigv4proxy"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901"]
