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
# make test4 runs every test that uses the test broker (integration, example, fault tests...)
# again on RabbitMQ 4: at MQKIT_TEST_URL4 (with MQKIT_TEST_CTL4, a command that runs
# rabbitmqctl against it) when set, else on the node scripts/rabbitmq4.sh starts. Tests that
# start nodes of their own from the local RabbitMQ install run in make test's main pass only.
# (Markers set by tests/conftest.py. No cache: the main pass may write .pytest_cache then.)
SUITES4 := tests
MARKS4 := broker and not own_nodes

.PHONY: help venv install broker check test test4 test-memory demo bench fmt clean

help: ## list the commands
	@echo "mqkit - make TARGET:"
	@awk -F ':.*## ' '/^[a-z0-9-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
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

# The main pass runs alongside test4 then test-memory (mostly waiting on brokers, they fit
# on two cores); their output is shown after the main pass's.
test: install ## everything: checks, all tests on the main broker; test4 and test-memory alongside
	@bash scripts/broker.sh $(TEST_URL)
	@bash scripts/postgres.sh  # the outbox tests' PostgreSQL (MQKIT_TEST_DB), found or started
	@$(MAKE) --no-print-directory check
	@if [ -z "$${MQKIT_TEST_URL4:-}" ]; then \
		MQKIT_TEST_URL4="$$(bash scripts/rabbitmq4.sh start)"; \
		MQKIT_TEST_CTL4="bash '$(CURDIR)/scripts/rabbitmq4.sh' ctl"; \
		export MQKIT_TEST_URL4 MQKIT_TEST_CTL4; \
	fi; \
	log4="$$(mktemp)"; logm="$$(mktemp)"; \
	trap 'rm -f "$$log4" "$$logm" "$$logm.status"' EXIT; \
	( status4=0; $(MAKE) --no-print-directory test4 >"$$log4" 2>&1 || status4=$$?; \
	  statusm=0; $(MAKE) --no-print-directory test-memory >"$$logm" 2>&1 || statusm=$$?; \
	  echo "$$status4 $$statusm" >>"$$logm.status" ) & \
	pid4=$$!; \
	echo "$(VENV)/bin/pytest $(PYTEST_ARGS)   (make test4, then make test-memory, run alongside)"; \
	status=0; \
	MQKIT_TEST_URL=$(TEST_URL) $(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	wait "$$pid4" || true; \
	read -r status4 statusm <"$$logm.status" || { status4=1; statusm=1; }; \
	echo; \
	echo "=============== make test4 (RabbitMQ 4), run alongside ==============="; \
	cat "$$log4"; \
	echo; \
	echo "=============== make test-memory (in-memory broker), run alongside ==============="; \
	cat "$$logm"; \
	echo "make test: main pass exit $$status, RabbitMQ 4 pass exit $$status4," \
	     "memory pass exit $$statusm"; \
	[ "$$status" = 0 ] && [ "$$status4" = 0 ] && [ "$$statusm" = 0 ]

test4: install ## the tests that use a broker (integration, examples, faults) on RabbitMQ 4
	@if [ -n "$${MQKIT_TEST_URL4:-}" ]; then \
		url4="$$MQKIT_TEST_URL4"; ctl4="$${MQKIT_TEST_CTL4:-}"; \
	else \
		url4="$$(bash scripts/rabbitmq4.sh start)"; \
		ctl4="bash '$(CURDIR)/scripts/rabbitmq4.sh' ctl"; \
	fi; \
	echo "$(VENV)/bin/pytest $(SUITES4) -m '$(MARKS4)' $(PYTEST_ARGS)  (on RabbitMQ 4)"; \
	status=0; \
	MQKIT_TEST_URL="$$url4" MQKIT_TEST_CTL="$$ctl4" MQKIT_TEST_EXPECT_VERSION=4. \
		$(VENV)/bin/pytest -p no:cacheprovider $(SUITES4) -m "$(MARKS4)" $(PYTEST_ARGS) \
		|| status=$$?; \
	if [ "$$status" = 5 ]; then \
		echo "make: PYTEST_ARGS selects no test that uses a broker: none ran on RabbitMQ 4"; \
		status=0; \
	fi; \
	exit "$$status"

test-memory: install ## the tests that use a broker, on mqkit's in-memory broker (memory://)
	@echo "$(VENV)/bin/pytest $(SUITES4) -m '$(MARKS4)' $(PYTEST_ARGS)  (on the memory broker)"
	@status=0; \
	MQKIT_TEST_URL=memory://suite $(VENV)/bin/pytest -p no:cacheprovider $(SUITES4) \
		-m "$(MARKS4)" $(PYTEST_ARGS) || status=$$?; \
	if [ "$$status" = 5 ]; then \
		echo "make: PYTEST_ARGS selects no test that uses a broker: none ran on memory"; \
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
