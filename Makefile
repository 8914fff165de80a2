# The two commands of the README: `make run` (whole pipeline) and `make test` (the test suite).
# Both create or reuse .venv and install the project into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1
# Where MNIST's four .gz files are read from when there is no internet (empty: the official mirrors).
TUNELINE_DATA_MIRROR ?= $(wildcard $(abspath ../shared/data/MNIST/raw))
export TUNELINE_DATA_MIRROR

.PHONY: install run test test-fast lint clean
install: $(VENV)/.installed

# pip, not uv/poetry: torch comes from this machine's local wheels (see README, "Installation").
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

run: install
	$(VENV)/bin/tuneline run $(ARGS)

# Two xdist workers: the suite is mostly end-to-end runs that wait on subprocesses and servers.
# Both targets list the 15 slowest tests at the end (--durations=15): what to look at when the suite slows down.
PYTEST_ARGS ?= -n 2 --dist worksteal
test: install
	$(PY) -m pytest $(PYTEST_ARGS) --durations=15

# The inner loop, under a minute: the tests marked `fast` (synthetic data and a tiny ONNX model; no MNIST, no
# PostgreSQL, no Prefect or DVC subprocesses: tests/conftest.py refuses a fast test that needs them). One
# process: starting xdist workers (each imports torch and collects the suite) costs more than they save here.
FAST_PYTEST_ARGS ?= -p no:xdist
test-fast: install
	$(PY) -m pytest -m fast $(FAST_PYTEST_ARGS) --durations=15

clean:
	rm -rf data/raw data/prepared models metrics reports .prefect
