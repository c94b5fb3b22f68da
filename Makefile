# quantmesh — the commands people type. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
CACHE_DIR ?= $(HOME)/.cache/quantmesh
export UV_CACHE_DIR ?= $(CACHE_DIR)/uv
export QM_CACHE_DIR ?= $(CACHE_DIR)
UV := $(CACHE_DIR)/tools/uv-$(UV_VERSION)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
STACK := deploy/local/stack.sh
STACK_DIR ?= $(CURDIR)/deploy/local/.stack
export QM_STACK_DIR := $(STACK_DIR)
# Loaded into every recipe that talks to the stack: the addresses `stack.sh up` wrote.
WITH_STACK_ENV := set -a; [ -f $(STACK_DIR)/env ] && source $(STACK_DIR)/env; set +a;
PYTEST_ARGS ?=

.PHONY: help
help: ## list the commands
	@grep -hE '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(CACHE_DIR)/tools/uv-$(UV_VERSION)
	$(CACHE_DIR)/tools/uv-$(UV_VERSION)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
	$(UV) sync --frozen --all-packages --python $(PYTHON)
	@touch $@

.PHONY: venv
venv: $(VENV)/.synced ## create the virtualenv with every package of the workspace

.PHONY: lock
lock: $(UV) ## re-resolve uv.lock after a dependency change
	$(UV) lock

.PHONY: up
up: venv ## start the local stack (Kafka, PostgreSQL, Redis), create topics, apply migrations
	$(STACK) up
	$(WITH_STACK_ENV) $(VENV)/bin/quantmesh-topics create && $(VENV)/bin/quantmesh-migrate

.PHONY: down
down: ## stop the local stack
	$(STACK) down

.PHONY: status
status: ## show what runs in the local stack
	$(STACK) status

.PHONY: lint
lint: venv ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPYPATH=$$(printf '%s:' services/*/src libs/embedded/src) $(VENV)/bin/mypy libs/common/src libs/common/tests bench conftest.py
	MYPYPATH=$$(printf '%s:' services/*/src libs/embedded/src) $(VENV)/bin/mypy services/*/src services/*/tests libs/embedded/src libs/embedded/tests tests tools

.PHONY: test-unit
test-unit: venv ## unit tests only (no stack needed)
	$(VENV)/bin/pytest -m "not integration and not e2e" $(PYTEST_ARGS)

# The whole suite on real parts. The stack is started if it is not running and stopped again
# at the end, also on failure; a stack that was already up is left as it was. Where a Docker
# engine answers, the tests start testcontainers instead (conftest.py says which). helm is
# and kustomize are built once from the Go module proxy (minutes, then cached) and promtool
# unpacked from Debian's prometheus package while lint and the stack start.
.PHONY: test
test: venv ## lint, then every test (unit, integration, e2e) on a real Kafka, PostgreSQL and Redis
	@mkdir -p $(CACHE_DIR); \
	tools/get-helm.sh >$(CACHE_DIR)/get-helm.log 2>&1 & helm_pid=$$!; \
	tools/get-promtool.sh >$(CACHE_DIR)/get-promtool.log 2>&1 & prom_pid=$$!; \
	tools/get-kustomize.sh >$(CACHE_DIR)/get-kustomize.log 2>&1 & kust_pid=$$!; \
	$(MAKE) --no-print-directory lint; \
	started=0; \
	if [ -n "$${QM_KAFKA_BOOTSTRAP:-}" ]; then \
		echo "test: using the stack named by QM_KAFKA_BOOTSTRAP"; \
	elif docker info >/dev/null 2>&1; then \
		echo "test: a Docker engine answers: the tests run on testcontainers"; \
	else \
		if ! $(STACK) status >/dev/null 2>&1; then started=1; fi; \
		trap 'if [ $$started = 1 ]; then $(STACK) down; fi' EXIT; \
		$(MAKE) --no-print-directory up; \
		set -a; source $(STACK_DIR)/env; set +a; \
	fi; \
	if ! wait $$helm_pid; then \
		echo "test: WARNING: building helm failed, the chart tests will skip:"; \
		tail -5 $(CACHE_DIR)/get-helm.log; \
	fi; \
	if ! wait $$kust_pid; then \
		echo "test: WARNING: building kustomize failed, the overlay tests will skip:"; \
		tail -5 $(CACHE_DIR)/get-kustomize.log; \
	fi; \
	if ! wait $$prom_pid; then \
		echo "test: WARNING: no promtool, the rule and dashboard checks will skip:"; \
		tail -5 $(CACHE_DIR)/get-promtool.log; \
	fi; \
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-%: venv ## tests of one part: test-common, test-risk, test-e2e, ...
	@case "$*" in common) dir=libs/common;; e2e) dir=tests/e2e;; deploy) dir=tests/deploy;; *) dir=services/$*;; esac; \
	$(WITH_STACK_ENV) $(VENV)/bin/pytest $$dir $(PYTEST_ARGS)

.PHONY: bench
bench: venv ## every bench/bench_*.py, one JSON object each (start the stack first: make up)
	@$(WITH_STACK_ENV) for script in bench/bench_*.py; do $(PY) $$script || exit 1; done

.PHONY: run
run: venv ## paper trading in one process: every stage, the synthetic feed, a live view (Ctrl-C stops)
	$(VENV)/bin/quantmesh run

.PHONY: run-mesh
run-mesh: venv ## the local stack plus every service as its own process on Kafka (Ctrl-C stops)
	$(MAKE) --no-print-directory up
	$(WITH_STACK_ENV) $(PY) -m quantmesh_common.launcher

run-%: venv ## run one service in the foreground against the local stack: run-risk, ...
	$(WITH_STACK_ENV) QM_SERVICE_NAME=$* $(VENV)/bin/quantmesh-$*

.PHONY: schemas
schemas: venv ## re-export the committed JSON Schemas after an additive change
	$(PY) -m quantmesh_common.schema_export --write

.PHONY: k8s
k8s: ## re-render deploy/k8s/base/quantmesh.yaml from the chart (after a chart or values change)
	@tools/get-helm.sh >/dev/null
	$(CACHE_DIR)/bin/helm template quantmesh deploy/helm/quantmesh --namespace quantmesh \
		--kube-version 1.34.0 -f deploy/k8s/base/values.yaml > deploy/k8s/base/quantmesh.yaml

.PHONY: clean
clean: ## remove the virtualenv and caches in the checkout (not the download cache)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
