# Two entry points, each doing all of its own set-up on a fresh machine with Python 3.11:
#   make reproduce   fetch the data, run every notebook headless at PRESET (default cpu)
#   make test        the linter, the test suite, and the smoke-preset notebooks re-executed and compared by nbval
# and, for reading and editing the notebooks:
#   make lab         a Jupyter kernel bound to .venv ("Python (turbosparse)"), JupyterLab on notebooks/
PY ?= python3
VENV ?= .venv
PRESET ?= cpu
BIN := $(VENV)/bin
KERNEL := turbosparse

.PHONY: setup data reproduce test lint test-benchmarks lab smoke-copies

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[notebooks,dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"
	touch $@

data: setup
	$(BIN)/turbosparse-data

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[notebooks,dev,bench]'
	touch $@

# llama.cpp (the bench extra, ~6 minutes to compile) is the baseline of notebook 06 at the cpu and paper
# presets; at smoke that notebook skips it, so the smoke run does not build it.
REPRODUCE_DEPS := data $(if $(filter smoke,$(PRESET)),,$(VENV)/.installed-bench)

# ... then the README's claims table from the cpu results (notebook 99 shows it at any preset)
reproduce: $(REPRODUCE_DEPS)
	$(BIN)/turbosparse-notebooks --preset $(PRESET)
	$(if $(filter cpu,$(PRESET)),$(BIN)/turbosparse-report --preset cpu)

# nbval re-executes the committed smoke-preset copies (notebooks/executed/smoke/, kept in step with the notebooks
# by tests/test_notebooks_runner.py) and compares the cells marked NBVAL_CHECK_OUTPUT
test: data lint
	$(BIN)/python -m pytest -q tests --nbval-lax $(wildcard notebooks/executed/smoke/[0-9][0-9]_*.ipynb)

# the linter and the formatter (ruff, configured in pyproject.toml) over the library, the tests and the benchmark scripts
lint: setup
	$(BIN)/ruff check turbosparse_lib tests benchmarks
	$(BIN)/ruff format --check turbosparse_lib tests benchmarks

# regenerate the smoke copies after editing a notebook
smoke-copies: data
	$(BIN)/turbosparse-notebooks --preset smoke

lab: data
	$(BIN)/jupyter lab --notebook-dir=notebooks

# timing runs and the llama.cpp build: not part of `make test`
test-benchmarks: data
	$(BIN)/python -m pytest -q -m benchmark tests
