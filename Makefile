# Two commands do all the set-up on a fresh machine:
#   make serve   start the gateway on embedded defaults (SQLite, local files) with the built-in simulator
#   make test    install everything and run the whole test suite
#   make lint    ruff check and ruff format --check (fix with: .venv/bin/ruff check --fix; .venv/bin/ruff format)
#   make typecheck   mypy on the package (configuration in pyproject.toml)
#   make unit    the fast loop while changing code (under a minute, no services)
# All create ./.venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve lint typecheck unit test test-quick bench clean

$(BIN)/.installed: pyproject.toml
	@echo "==> creating $(VENV) and installing batch-gateway with its test dependencies"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/batch-gateway serve --simulate --auth open

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The fast loop: the pure modules, the API handlers through Litestar's in-process client, the stores on SQLite.
# Leaves out what starts processes, runs end to end, takes seconds, or needs PostgreSQL, Redis, S3, a real engine or
# the control plane (the markers in pyproject.toml); `make test` runs those too.
UNIT_MARKERS := not (e2e or process or slow or production or real_engine or control_plane)
unit: install
	$(BIN)/python -m pytest -m "$(UNIT_MARKERS)" $(PYTEST_ARGS)

# The whole suite: unit, integration (PostgreSQL, Redis, an S3 server), end-to-end, the real-engine tests and the
# control-plane tests (real Kubernetes and Argo, built once by scripts/install-control-plane.sh). It ends with the 15
# slowest tests, so that a CI run that grows says where the time went.
test: install
	scripts/ensure-services.sh
	scripts/install-control-plane.sh
	scripts/install-real-engine.sh
	scripts/install-tools.sh
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# Everything except the tests that need the real llama.cpp engine or the control plane (only Argo's CRDs are fetched).
test-quick: install
	scripts/ensure-services.sh
	scripts/install-control-plane.sh crds
	scripts/install-tools.sh
	$(BIN)/python -m pytest -m "not real_engine and not control_plane" $(PYTEST_ARGS)

bench: install
	scripts/install-real-engine.sh
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .batch-gateway .pytest_cache .ruff_cache .mypy_cache
