# The README's commands. Each creates .venv when missing: torch==2.13.0 (CPU wheel) first, then wam.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

BASE_VENV := .venv-baselines
BASE_STAMP := $(BASE_VENV)/.installed

.PHONY: demo test test-slow bench lint setup baselines clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
# setuptools warns on every editable install whose package root is the repository root ("folders in your
# working directory with the same name as your package may take precedence"); wam's checkout has no such
# folder, so the warning says nothing about it and is silenced here, by its message only.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# `wam baseline train` runs d3rlpy in this separate environment: d3rlpy 2.8.1 pins gymnasium==1.0.0,
# which wam's own environment must not get. torch==2.13.0 first (the CPU wheel), as for .venv.
$(BASE_STAMP):
	test -x $(BASE_VENV)/bin/python || $(PY) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/pip install --quiet --upgrade pip
	$(BASE_VENV)/bin/pip install --quiet torch==2.13.0
	$(BASE_VENV)/bin/pip install --quiet d3rlpy==2.8.1 h5py numpy
	touch $(BASE_STAMP)

baselines: $(BASE_STAMP)

demo: $(STAMP)
	$(BIN)/wam demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/wam bench all --json

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BASE_VENV) build *.egg-info
