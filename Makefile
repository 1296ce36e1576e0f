# Two entry points, each doing all of its own set-up on a fresh machine with Python 3.11:
#   make reproduce   fetch the data, run every notebook headless at PRESET (default cpu)
#   make test        the test suite, the notebooks under nbval (smoke preset) included
PY ?= python3
VENV ?= .venv
PRESET ?= cpu
BIN := $(VENV)/bin

.PHONY: setup data reproduce test test-benchmarks clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[notebooks,dev]'
	touch $@

data: setup
	$(BIN)/turbosparse-data

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[notebooks,dev,bench]'
	touch $@

# llama.cpp (the bench extra, ~6 minutes to compile) is the baseline of notebook 06 at the cpu and paper
# presets; at smoke that notebook skips it, so the smoke run does not build it.
REPRODUCE_DEPS := data $(if $(filter smoke,$(PRESET)),,$(VENV)/.installed-bench)

reproduce: $(REPRODUCE_DEPS)
	$(BIN)/turbosparse-notebooks --preset $(PRESET)

test: data
	$(BIN)/python -m pytest -q tests --nbval-lax $(wildcard notebooks/[0-9][0-9]_*.ipynb)

# timing runs and the llama.cpp build: not part of `make test`
test-benchmarks: data
	$(BIN)/python -m pytest -q -m benchmark tests
