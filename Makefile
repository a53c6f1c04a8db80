# Every target creates the virtualenv it needs; a fresh machine needs only python3, pip and make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: venv test compile uncompile run image bench bench-quick bench-start bench-sign loadtest soak fuzz clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The lowest supported release of every runtime dependency (constraints/lowest.txt, the floors in
# pyproject.toml), in a second virtualenv: `make test` runs the suite against both.
LOWEST ?= .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed-dev
$(LOWEST_STAMP): pyproject.toml constraints/lowest.txt
	rm -rf $(LOWEST)
	$(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --upgrade pip
	$(LOWEST)/bin/pip install -q -c constraints/lowest.txt -e '.[dev]'
	touch $(LOWEST_STAMP)

# The layers' import contracts (pyproject's [tool.importlinter]), ruff (lint and format) and mypy
# on the package first: seconds, before the suite.
# Then the whole suite twice: with the newest releases in range, the default (lean) servers and
# the compiled build (setup.py: the hot modules compiled with mypyc, in place, removed after the
# pass), then with the lowest releases, the reference servers (aiohttp for inbound HTTP/1.1, the
# h2 library for inbound HTTP/2) and pure Python. So the floors, both implementations and both
# builds each see every test, in one pass apiece; the modules that pin one implementation
# (test_inbound_h1_lean, and test_inbound_h2_frames, which runs both servers) keep doing so in
# either pass. The second pass leaves out the container image tests: they build the image from
# the newest releases.
H1_OTHER ?= aiohttp
H2_SERVER_OTHER ?= h2
test: $(STAMP) $(LOWEST_STAMP)
	sh scripts/ci-deps.sh $(BIN)/python
	$(BIN)/lint-imports
	$(BIN)/ruff check sigv4proxy
	$(BIN)/ruff format --check sigv4proxy
	$(BIN)/mypy
	$(MAKE) --no-print-directory compile
	SIGV4PROXY_EXPECT_COMPILED=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS); \
		status=$$?; $(MAKE) --no-print-directory uncompile; exit $$status
	SIGV4PROXY_H1_IMPLEMENTATION=$(H1_OTHER) SIGV4PROXY_H2_SERVER_IMPLEMENTATION=$(H2_SERVER_OTHER) \
		$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/test_image.py $(PYTEST_ARGS)

# The compiled build in place in the tree (test_compiled_build checks which one a pass runs):
# `make compile` builds it with the dev venv's Python, `make uncompile` goes back to pure Python.
compile: $(STAMP)
	SIGV4PROXY_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace

uncompile:
	find sigv4proxy -name '*.so' -delete
	rm -rf build

run: $(STAMP)
	$(BIN)/sigv4proxy demo

# The container image, tagged sigv4proxy:latest and :VERSION, with a real engine (started here as
# root when none runs, stopped after); then its size and start-up in containers. The base is the
# official Python image when it can be pulled, else one made from Debian packages
# (scripts/make-base.sh); PYTHON_IMAGE=... picks one. Cold here: about 2 minutes; warm: seconds.
image: $(STAMP)
	sh scripts/ci-deps.sh
	$(BIN)/python scripts/image.py $(IMAGE_ARGS)

bench-sign: $(STAMP)
	$(BIN)/python benchmarks/bench_sign.py
	$(BIN)/python benchmarks/bench_metrics.py

clean:
	rm -rf $(VENV) $(LOWEST) $(BENCH_VENV) .pytest_cache .hypothesis build *.egg-info
	find sigv4proxy -name '*.so' -delete

# The benchmark matrix (< 15 min; bench-quick < 3 min): bench-results/bench.md, .json, .png.
# GO_PEERS: where the Go aws-sigv4-proxy builds are (docs/performance.md says how to build them;
# their rows are flagged "not built" until then). Extra flags: make bench BENCH_ARGS="--peer
# 'CMD --port {port} ...' --peer-name NAME" (python benchmarks/bench.py --help).
# BENCH_PYTHON: the interpreter the proxy under test runs on, in its own .venv-bench. By default
# Debian's python3.11, the one the image is built on here (linked statically, PGO and LTO); the
# dev venv's when the machine has none (bench.md's title names the one used).
GO_PEERS ?= $(or $(TMPDIR),/tmp)/peers
BENCH_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) $(PY))
BENCH_VENV := .venv-bench
# Ours as the image has it: the compiled build (setup.py), installed (not editable), rebuilt when
# a source changes. Pure first, which brings the dependencies the compile type-checks against;
# the compiler is the dev venv's mypy.
$(BENCH_VENV)/.installed: $(STAMP) pyproject.toml setup.py $(shell find sigv4proxy -name '*.py')
	sh scripts/ci-deps.sh $(BENCH_PYTHON)
	rm -rf $(BENCH_VENV) build
	$(BENCH_PYTHON) -m venv --without-pip $(BENCH_VENV)
	$(BIN)/pip --python $(BENCH_VENV)/bin/python install -q "setuptools>=77" \
		"mypy==$$($(BIN)/python -c 'import mypy.version; print(mypy.version.__version__)')" .
	rm -rf build  # setuptools packs whatever build/lib holds: no extension from an earlier build
	SIGV4PROXY_COMPILE=1 $(BIN)/pip --python $(BENCH_VENV)/bin/python install -q --no-build-isolation \
		--no-deps --force-reinstall .
	touch $@
bench: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench.py --go-peers $(GO_PEERS) --proxy-cmd $(BENCH_VENV)/bin/sigv4proxy $(BENCH_ARGS)

# Start to /readyz and idle RSS, 1 and 2 workers (make bench runs it too): bench-results/start.md.
bench-start: $(STAMP)
	$(BIN)/python benchmarks/bench_start.py $(BENCH_START_ARGS)

bench-quick: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench.py --quick --go-peers $(GO_PEERS) --proxy-cmd $(BENCH_VENV)/bin/sigv4proxy $(BENCH_ARGS)

# Headless locust for a bounded time against SIGV4PROXY_TARGET (default: the demo, started here
# when nothing listens): CSV and HTML reports in loadtest-results/. WORKERS=N runs locust's
# distributed mode here (a master and N worker processes, one merged report); for a cluster,
# config/loadtest/locust.yaml.
WORKERS ?= 0
loadtest: $(STAMP)
	$(BIN)/python loadtests/locustfile.py --workers $(WORKERS) $(LOADTEST_ARGS)

# Soak: mixed traffic through a proxy process with rotating credentials and injected GOAWAYs;
# fails on unexplained errors, RSS growth >= 10 % or fd growth. SOAK_SECONDS shortens it.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

# Longer fuzzing of the inbound path, the canonicalizer and what an upstream sends back (make test
# runs 30 examples a test; the default 1000 took 223-231 s here). Each example is bounded by its
# own socket timeouts; the per-test timeout is raised to fit a thousand of them.
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	SIGV4PROXY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider --timeout 1800 \
		tests/test_fuzz.py tests/test_fuzz_upstream.py $(PYTEST_ARGS)
