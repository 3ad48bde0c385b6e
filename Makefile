# Quick start: `make demo` plays the double-charge stories; `make test` runs the suite.
# Each target sets itself up: a virtual environment in .venv and, where missing,
# Debian's redis-server package (as root).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv redis demo test lint typecheck bench bench-tracing loadtest-smoke k8s-validate clean

help:
	@echo "make demo            the double-charge stories, direct and through five proxy replicas"
	@echo "make test            the test suite (starts its own Redis servers and backends)"
	@echo "make lint            ruff check + format check"
	@echo "make typecheck       mypy on proxy/"
	@echo "make bench           the benchmark (writes docs/benchmarks.md)"
	@echo "make bench-tracing   what tracing costs per request (writes docs/benchmarks-tracing.md)"
	@echo "make loadtest-smoke  a short headless locust run against local replicas"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "idempotency-proxy needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

venv: $(STAMP)

# The tests and the demo start their own redis-server processes; install one if missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || ./scripts/install-redis.sh

demo: venv
	@command -v redis-server >/dev/null 2>&1 || ./scripts/install-redis.sh --optional
	$(BIN)/idempotency-proxy demo

test: venv redis
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check proxy sample_backend tests loadtests scripts
	$(BIN)/ruff format --check proxy sample_backend tests loadtests scripts

typecheck: venv
	$(BIN)/mypy proxy

bench: venv redis
	$(BIN)/python scripts/bench.py --write docs/benchmarks.md

bench-tracing: venv
	PYTHONPATH=. $(BIN)/python scripts/bench_tracing.py --write docs/benchmarks-tracing.md

k8s-validate: venv
	./scripts/validate-k8s.sh

loadtest-smoke: venv redis
	$(BIN)/python loadtests/smoke.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache out
