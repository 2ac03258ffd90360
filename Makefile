# vmigrate: two commands on a fresh Debian 12 machine (as root):
#   make demo   install what is needed, then run the demo in the lab
#   make test   install what the tests need, then run the whole suite
# and one for every step of a contributor (no root, no lab, under 3 minutes):
#   make check  lint, types and the unit tests
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check setup setup-dev lint unit e2e clean

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

demo: setup
	$(VENV)/bin/vmigrate demo

lint: setup-dev
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

unit: setup-dev
	$(PY) -m pytest -q tests/unit

check: lint
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

e2e: setup-dev
	$(PY) -m pytest -q tests/e2e

test: lint
	$(PY) -m pytest -q -ra --durations=25 tests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build src/*.egg-info
