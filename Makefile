# Two entry points (see README): `make demo` and `make test`.
# Both create ./.venv on first use, with nothing installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

$(VENV)/.base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test test-fast lint
demo: $(VENV)/.base
	$(PY) -m faithful_rl.train --config=configs/demo.py --workdir=$(WORKDIR)

lint: $(VENV)/.test
	$(VENV)/bin/pyink --check --quiet faithful_rl tests benchmarks configs scripts experiments

test: $(VENV)/.test lint
	$(PY) -m pytest -q -x --numprocesses=auto --maxprocesses=4 --dist=loadfile tests

# The suite without the tests marked slow, for the edit-test loop; CI runs
# `make test`.
test-fast: $(VENV)/.test lint
	$(PY) -m pytest -q -x --numprocesses=auto --maxprocesses=4 --dist=loadfile -m "not slow" tests
