# The two commands of the README: `make demo` and `make test`. Both set up
# everything they need on a fresh machine (a virtual environment in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test test-slow lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[torch,test]"
	touch $@

demo: setup
	$(PY) scripts/demo.py --config configs/demo.py --workdir $(WORKDIR)

test: setup
	$(PY) -m ruff check safealign_jax scripts tests  # configs/ links to safealign_jax/configs
	$(PY) -m pytest -q tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests
