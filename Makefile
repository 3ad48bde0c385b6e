# Quick start: `make demo` plays the double-charge stories; `make test` runs the suite.
# Each target sets itself up: a virtual environment in .venv and, where missing,
# Debian's redis-server package (as root).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Runtime dependencies, pinned with hashes (`make lock` refreshes it).
LOCK := requirements.lock

.PHONY: help venv redis demo test lint typecheck bench bench-tracing loadtest-smoke k8s-validate lock clean

help:
	@echo "make demo            the double-charge stories, direct and through five proxy replicas"
	@echo "make test            the test suite (starts its own Redis servers and backends)"
	@echo "make lint            ruff check + format check"
	@echo "make typecheck       mypy on proxy/ and devstack/"
	@echo "make bench           the benchmark (writes docs/benchmarks.md)"
	@echo "make bench-tracing   what tracing costs per request (writes docs/benchmarks-tracing.md)"
	@echo "make loadtest-smoke  a short headless locust run against local replicas"
	@echo "make lock            re-resolve requirements.lock (UPGRADE=1: newest allowed versions)"

# The runtime dependencies come from the lock, hash-checked, exactly as in the image; the
# project itself without dependencies; then the test and dev tools (not in the image).
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "idempotency-proxy needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python scripts/check-lock.py $(LOCK)
	@touch $(STAMP)

venv: $(STAMP)

# The tests and the demo start their own redis-server processes; install one if missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || ./scripts/install-redis.sh

demo: venv
	@command -v redis-server >/dev/null 2>&1 || ./scripts/install-redis.sh --optional
	$(BIN)/idempotency-proxy demo

test: venv redis
	$(BIN)/python -m pytest -q -n auto

lint: venv
	$(BIN)/ruff check proxy devstack sample_backend tests loadtests scripts
	$(BIN)/ruff format --check proxy devstack sample_backend tests loadtests scripts

typecheck: venv
	$(BIN)/mypy proxy devstack

# wrk is the benchmark's load generator; without it a slower asyncio one stands in.
bench: venv redis
	@command -v wrk >/dev/null 2>&1 || ./scripts/install-wrk.sh --optional
	$(BIN)/python scripts/bench.py --write docs/benchmarks.md --profile out/profile

bench-tracing: venv
	PYTHONPATH=. $(BIN)/python scripts/bench_tracing.py --write docs/benchmarks-tracing.md

k8s-validate: venv
	./scripts/validate-k8s.sh

loadtest-smoke: venv redis
	$(BIN)/python loadtests/smoke.py

# uv resolves for every platform and Python >= 3.11 at once and records each file's hash.
# The lock holds what the image installs: the dependencies and the `tracing` extra.
lock: venv
	$(BIN)/pip install --quiet 'uv>=0.4'
	$(BIN)/uv pip compile pyproject.toml --extra tracing --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) -o $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache out
