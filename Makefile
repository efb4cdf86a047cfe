# CesaFlow: `make run` serves the product offline; `make test` runs lint, types and the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# Tests use real PostgreSQL and Redis; override these to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/cesaflow
TEST_REDIS_URL ?= redis://127.0.0.1:6379/1

.PHONY: run test lint typecheck pytest install install-dev lock clean bench bench-profile image image-smoke compose-smoke

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Installs are hash-locked: requirements.lock / requirements-dev.lock pin every transitive dependency with the hashes
# of its published files, so pip refuses anything else. The human-edited pins stay in requirements*.txt; after
# changing one, `make lock` (add LOCK_ARGS=--upgrade to refresh the transitive ones too), then `make test`:
# tests/test_requirements_lock.py fails while a pin and its lock disagree.
$(VENV)/.runtime: requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	touch $@

$(VENV)/.dev: requirements.lock requirements-dev.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# The dev lock first; the runtime lock is constrained by it, so a package both need has one version in both.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe \
	--strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(LOCK_ARGS)
lock: $(VENV)/.dev
	$(PIP_COMPILE) --output-file requirements-dev.lock requirements-dev.txt
	$(PIP_COMPILE) --constraint requirements-dev.lock --output-file requirements.lock requirements.txt

SIMULATOR_PORT ?= 8765

# The provider simulator runs beside the server (loopback only) so the demo org's keys work offline. The server runs
# with DEBUG (tracebacks, static files served by runserver) unless CESAFLOW_DEBUG says otherwise: only here.
run: $(VENV)/.runtime
	@command -v bwrap >/dev/null 2>&1 || echo "NOTE: bubblewrap is not installed, so agent runs cannot run commands (they are refused, never unsandboxed). Debian: apt-get install bubblewrap; or CESAFLOW_SANDBOX=none (unsafe, development only)."
	$(BIN)/python manage.py migrate --noinput
	@$(BIN)/python manage.py provider_simulator --port $(SIMULATOR_PORT) > var/provider-simulator.log 2>&1 & \
	  sim=$$!; trap 'kill $$sim 2>/dev/null' EXIT INT TERM; \
	  $(BIN)/python manage.py ensure_demo --simulator-url http://127.0.0.1:$(SIMULATOR_PORT) && \
	  CESAFLOW_DEBUG="$${CESAFLOW_DEBUG:-true}" $(BIN)/python -m cesaflow.serve runserver $(HOST):$(PORT)

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

# Where the gateway's CPU goes: py-spy (installed under var/ on first use) over one server under sequential load.
bench-profile: $(VENV)/.dev
	$(BIN)/python bench/profile.py $(PROFILE_ARGS)

# The container image with podman, from a Debian base built here (README "Container image and compose").
image:
	deploy/image.sh

# Build, then run the image against this machine's PostgreSQL and Redis: /readyz, the healthcheck, the sandbox.
image-smoke:
	deploy/image-smoke.sh

# deploy/compose.yaml with podman-compose: HTTPS through Caddy on loopback, a run streamed through it.
compose-smoke:
	deploy/compose-smoke.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
