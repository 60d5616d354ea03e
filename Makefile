# Every install step lives here, so a fresh machine needs only `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests and the local stack need, and a binary that proves each is there.
APT_PACKAGES := mosquitto influxdb socat chromium docker-compose
APT_BINARIES := /usr/sbin/mosquitto /usr/bin/influxd /usr/bin/socat /usr/bin/chromium /usr/bin/docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps system-deps python-deps run test lint bench mutation clean

all: test

deps: system-deps python-deps

system-deps:
	@missing=0; for b in $(APT_BINARIES); do [ -x "$$b" ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

python-deps: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: deps
	$(VENV)/bin/penctl demo

test: deps lint
	$(PY) -m pytest -q

lint: python-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Mutation testing of the safety core (gate, monitor, states and its tables, ledger,
# framing) against the fast pure tests; never part of `make test` (about 15 minutes).
# Scores per file and every survivor are printed; equivalent mutants are listed with
# their reason in tests/mutation/EQUIVALENT.md. Exit 1 if a mutant survives.
MUTATION_EXAMPLES ?= 25
mutation: python-deps
	rm -rf mutants
	STATEFUL_EXAMPLES=$(MUTATION_EXAMPLES) $(VENV)/bin/mutmut run --max-children 2
	$(PY) tests/mutation/score.py; s=$$?; \
	STATEFUL_EXAMPLES=$(MUTATION_EXAMPLES) PYTHONPATH=. $(PY) tests/mutation/tables.py; t=$$?; \
	exit $$(( s | t ))

# Every figure of product.md section 10; the JSON also names the machine.
# `make bench BENCH_ARGS=--quick` for the two-minute version.
bench: deps
	@mkdir -p var
	$(VENV)/bin/penctl bench --json var/bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
