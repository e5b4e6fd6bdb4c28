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
# make test then runs the suites that talk to a broker by URL again on RabbitMQ 4: at
# MQKIT_TEST_URL4 (with MQKIT_TEST_CTL4, a command that runs rabbitmqctl against it) when set,
# else on the node scripts/rabbitmq4.sh starts. Fault tests that start nodes of their own
# from the local RabbitMQ install (marker own_nodes) ran in the first pass already.
SUITES4 := tests/integration tests/examples tests/faults
MARKS4 := not own_nodes

.PHONY: help venv install broker check test test4 demo bench fmt clean

help: ## list the commands
	@echo "mqkit - make TARGET:"
	@awk -F ':.*## ' '/^[a-z0-9]+:.*## / {printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Broker: \$$MQKIT_URL (make test: \$$MQKIT_TEST_URL, else \$$MQKIT_URL), else the local"
	@echo "default amqp://guest:***@localhost:5672/; PYTEST_ARGS='-k name' narrows make test."
	@echo "RabbitMQ 4 (make test, make test4): \$$MQKIT_TEST_URL4 (+ \$$MQKIT_TEST_CTL4), else the"
	@echo "node scripts/rabbitmq4.sh starts (Debian 13's rabbitmq-server in a chroot, port 5673)."

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

test: install ## everything: checks, all tests on the main broker, then test4
	@bash scripts/broker.sh $(TEST_URL)
	@$(MAKE) --no-print-directory check
	@echo "$(VENV)/bin/pytest $(PYTEST_ARGS)"
	@MQKIT_TEST_URL=$(TEST_URL) $(VENV)/bin/pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test4

test4: install ## integration, example and fault tests against RabbitMQ 4
	@if [ -n "$${MQKIT_TEST_URL4:-}" ]; then \
		url4="$$MQKIT_TEST_URL4"; ctl4="$${MQKIT_TEST_CTL4:-}"; \
	else \
		url4="$$(bash scripts/rabbitmq4.sh start)"; \
		ctl4="bash '$(CURDIR)/scripts/rabbitmq4.sh' ctl"; \
	fi; \
	echo "$(VENV)/bin/pytest $(SUITES4) -m '$(MARKS4)' $(PYTEST_ARGS)  (on RabbitMQ 4)"; \
	status=0; \
	MQKIT_TEST_URL="$$url4" MQKIT_TEST_CTL="$$ctl4" MQKIT_TEST_EXPECT_VERSION=4. \
		$(VENV)/bin/pytest $(SUITES4) -m "$(MARKS4)" $(PYTEST_ARGS) || status=$$?; \
	if [ "$$status" = 5 ]; then \
		echo "make: PYTEST_ARGS selects none of $(SUITES4): nothing to run on RabbitMQ 4"; \
		status=0; \
	fi; \
	exit "$$status"

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
