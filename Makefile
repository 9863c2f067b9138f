# Set-up and checks. `make demo` and `make test` work on a fresh machine: each creates the
# virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PARITY_VENV ?= .venv-parity
ACCEL_VENV ?= .venv-accel
PY := $(VENV)/bin/python
PARITY_PY := $(PARITY_VENV)/bin/python
ACCEL_PY := $(ACCEL_VENV)/bin/python
# Every environment installs the exact versions the tests ran with (pip constraints).
LOCK := requirements/lock.txt
# `make accel-check ACCEL_EXTRAS=test,tpu,cuda12` adds the 8 x H100 compile (about 5 GB).
ACCEL_EXTRAS ?= test,tpu
ACCEL_RESULTS ?= workdirs/accel-check/results.jsonl
# One stamp per set of extras: asking for more (cuda12) installs them into the existing venv.
comma := ,
ACCEL_STAMP := $(ACCEL_VENV)/.installed-$(subst $(comma),-,$(ACCEL_EXTRAS))
PYTEST_WORKERS ?= 2
DEMO_WORKDIR ?= workdirs/demo

.PHONY: install test test-slow lint format parity accel-check clean demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[test]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not parity and not accel and not slow" tests

# The end-to-end runs of half a minute or more (multi-process, SIGTERM, sweeps, recipe
# smoke runs); CI runs them after `make test`.
test-slow: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow tests

$(PARITY_VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	test -x $(PARITY_PY) || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) -m pip install --quiet -c $(LOCK) -e '.[test,parity]'
	touch $@

parity: $(PARITY_VENV)/.installed
	$(PARITY_PY) -m pytest -q -m parity tests

$(ACCEL_STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(ACCEL_PY) || $(PYTHON) -m venv $(ACCEL_VENV)
	$(ACCEL_PY) -m pip install --quiet -c $(LOCK) -e '.[$(ACCEL_EXTRAS)]'
	touch $@

# Compiles every model family's train step (and the eval step and both BatchNorm choices of
# U-Net-ResNet50) for a TPU v5e-8 slice without the hardware (libtpu's compile-only devices;
# 8 x H100 too where the CUDA plugin is installed) at small sizes, and prints the per-device
# memory table. JAX itself runs on the CPU: about 8 CPU-minutes.
accel-check: $(ACCEL_STAMP)
	rm -f $(ACCEL_RESULTS)
	JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 AOT_RESULTS=$(ACCEL_RESULTS) \
		$(ACCEL_PY) -m pytest -q -n $(PYTEST_WORKERS) -m accel -p no:cacheprovider \
		--durations=3 tests/accel
	$(ACCEL_PY) -m benchmarks.aot_compile --table=$(ACCEL_RESULTS)

# Trains and evaluates a small U-Net and FCN-8s on the synthetic `shapes` data (about 7
# minutes on 2 CPU cores); rerunning resumes, `rm -rf $(DEMO_WORKDIR)` starts afresh.
demo: install
	$(PY) -m experiments.demo --workdir=$(DEMO_WORKDIR)

clean:
	rm -rf $(VENV) $(PARITY_VENV) $(ACCEL_VENV) *.egg-info .pytest_cache .ruff_cache
