# Set-up and checks. `make demo` and `make test` work on a fresh machine: each creates the
# virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PARITY_VENV ?= .venv-parity
PY := $(VENV)/bin/python
PARITY_PY := $(PARITY_VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: install test lint format parity clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not parity" tests

$(PARITY_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PARITY_PY) || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) -m pip install --quiet -e '.[test,parity]'
	touch $@

parity: $(PARITY_VENV)/.installed
	$(PARITY_PY) -m pytest -q -m parity tests

clean:
	rm -rf $(VENV) $(PARITY_VENV) *.egg-info .pytest_cache .ruff_cache
