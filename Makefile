# Set-up and checks. `make demo` and `make test` work on a fresh machine: each creates the
# virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PARITY_VENV ?= .venv-parity
PY := $(VENV)/bin/python
PARITY_PY := $(PARITY_VENV)/bin/python
PYTEST_WORKERS ?= 2
DEMO_WORKDIR ?= workdirs/demo

.PHONY: install test lint format parity clean demo

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

# Trains and evaluates a small U-Net and FCN-8s on the synthetic `shapes` data (about 7
# minutes on 2 CPU cores); rerunning resumes, `rm -rf $(DEMO_WORKDIR)` starts afresh.
demo: install
	$(PY) -m experiments.demo --workdir=$(DEMO_WORKDIR)

clean:
	rm -rf $(VENV) $(PARITY_VENV) *.egg-info .pytest_cache .ruff_cache
