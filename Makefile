# mqkit's developer commands. Each target sets up what it needs (virtualenv, install,
# broker), so `make demo` and `make test` work on a fresh machine.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Written after a successful install; reinstall only when pyproject.toml is newer.
STAMP := $(VENV)/.installed
DEFAULT_URL := amqp://guest:guest@localhost:5672/
# make test: MQKIT_TEST_URL, else MQKIT_URL, else the local broker (shell-expanded, so a
# password never passes through make).
TEST_URL := "$${MQKIT_TEST_URL:-$${MQKIT_URL:-$(DEFAULT_URL)}}"
PYTEST_ARGS ?=

.PHONY: help venv install broker check test demo bench fmt clean

help: ## list the commands
	@echo "mqkit - make TARGET:"
	@awk -F ':.*## ' '/^[a-z]+:.*## / {printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Broker: \$$MQKIT_URL (make test: \$$MQKIT_TEST_URL, else \$$MQKIT_URL), else the local"
	@echo "default amqp://guest:***@localhost:5672/; PYTEST_ARGS='-k name' narrows make test."

venv: $(PY) ## create the virtualenv in .venv

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
		echo "make: mqkit needs Python >= 3.10, but '$(PYTHON)' is" \
		     "'$$($(PYTHON) --version 2>&1 | head -n 1 || true)'." \
		     "Install a newer one and run e.g.: make PYTHON=python3.11 ..." >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "make: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install it with:" \
		     "sudo apt-get install python3-venv" >&2; exit 1; }

install: $(STAMP) ## install mqkit (editable) with its test tools into .venv

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -e '.[test]'
	@touch $@

broker: install ## make sure a RabbitMQ broker answers at MQKIT_URL, starting one if needed
	@bash scripts/broker.sh

check: install ## lint, format check and type check (ruff, mypy)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install ## everything: checks + unit, integration, fault, cluster and example tests
	@bash scripts/broker.sh $(TEST_URL)
	@$(MAKE) --no-print-directory check
	@echo "$(VENV)/bin/pytest $(PYTEST_ARGS)"
	@MQKIT_TEST_URL=$(TEST_URL) $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: broker ## run the whole example scenario (examples/demo.py)
	$(PY) -m examples.demo

bench: broker ## run the benchmarks (benchmarks/bench.py)
	$(PY) benchmarks/bench.py

fmt: install ## format and auto-fix (ruff)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove .venv and caches (a broker that was started keeps running)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
