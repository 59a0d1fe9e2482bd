# VannahHealthCloud: `make up` runs the platform, `make test` runs the tests (fresh machine ok).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA_DIR ?= $(CURDIR)/data

.PHONY: up viewer test install bootstrap bootstrap-bench lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# System packages (DCMTK, PostgreSQL) when missing; instant when present.
bootstrap:
	@bash .ci/bootstrap

bootstrap-bench:
	@bash .ci/bootstrap --bench

# The built-in viewer (OHIF, ~50 MB from the npm registry) is fetched once; offline, the
# platform still starts and /viewer says how to fetch it.
viewer: install
	$(BIN)/vannah viewer fetch --if-enabled || echo "vannah: viewer not fetched; /viewer answers 503"

up: install viewer
	VANNAH_DATA_DIR=$${VANNAH_DATA_DIR:-$(DATA_DIR)} $(BIN)/vannah up

test: bootstrap install
	$(BIN)/vannah viewer fetch  # tests/viewer/test_ohif.py opens it in Chromium
	$(BIN)/pytest -n 2 --dist loadfile --durations=40  # 2 processes: much of it waits on servers
	$(BIN)/pytest -q --doctest-modules vannah_pipelines receiver dicomweb  # docstring examples

lint: install
	$(BIN)/ruff check vannah_pipelines receiver dicomweb tests bench
	$(BIN)/mypy

# Every benchmark of docs/benchmarks.md, side by side with Orthanc (long: builds 100k/1M archives).
bench: bootstrap-bench install
	$(BIN)/python bench/store_throughput.py
	$(BIN)/python bench/index_throughput.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/qido_latency.py
	$(BIN)/python bench/wado_throughput.py
	$(BIN)/python bench/cfind_latency.py
	$(BIN)/python bench/cmove_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
