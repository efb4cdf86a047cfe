# CesaFlow: `make run` serves the product offline; `make test` runs lint, types and the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# Tests use real PostgreSQL and Redis; override these to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/cesaflow
TEST_REDIS_URL ?= redis://127.0.0.1:6379/1

.PHONY: run test lint typecheck pytest install install-dev clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

SIMULATOR_PORT ?= 8765

# The provider simulator runs beside the server (loopback only) so the demo org's keys work offline.
run: $(VENV)/.runtime
	@command -v bwrap >/dev/null 2>&1 || echo "NOTE: bubblewrap is not installed, so agent runs cannot run commands (they are refused, never unsandboxed). Debian: apt-get install bubblewrap; or CESAFLOW_SANDBOX=none (unsafe, development only)."
	$(BIN)/python manage.py migrate --noinput
	@$(BIN)/python manage.py provider_simulator --port $(SIMULATOR_PORT) > var/provider-simulator.log 2>&1 & \
	  sim=$$!; trap 'kill $$sim 2>/dev/null' EXIT INT TERM; \
	  $(BIN)/python manage.py ensure_demo --simulator-url http://127.0.0.1:$(SIMULATOR_PORT) && \
	  $(BIN)/python -m cesaflow.serve runserver $(HOST):$(PORT)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy .

pytest: $(VENV)/.dev
	@eval "$$($(BIN)/python tests/services.py --database-url '$(TEST_DATABASE_URL)' --redis-url '$(TEST_REDIS_URL)')" && \
	  export CESAFLOW_CHANNEL_LAYER_KEY="$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))')" && \
	  DATABASE_URL="$$CF_DATABASE_URL" REDIS_URL="$$CF_REDIS_URL" $(BIN)/python manage.py makemigrations --check --dry-run && \
	  DATABASE_URL="$$CF_DATABASE_URL" REDIS_URL="$$CF_REDIS_URL" $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The full schemathesis run over the REST API by hand (README "REST API"); `make test` runs a bounded one.
FUZZ_EXAMPLES ?= 25
FUZZ_SEED ?= 20261130
.PHONY: fuzz
fuzz: $(VENV)/.dev
	CESAFLOW_FUZZ_FULL=1 CESAFLOW_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CESAFLOW_FUZZ_SEED=$(FUZZ_SEED) \
	  $(MAKE) pytest PYTEST_ARGS="tests/fuzz -v $(FUZZ_ARGS)"

bench: $(VENV)/.dev
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
