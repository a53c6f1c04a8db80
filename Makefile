# Every target creates the virtualenv it needs; a fresh machine needs only python3, pip and make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: venv test run bench bench-sign loadtest soak fuzz clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	sh scripts/ci-deps.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/sigv4proxy demo

bench-sign: $(STAMP)
	$(BIN)/python benchmarks/bench_sign.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
