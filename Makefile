# Two commands do all set-up on a fresh machine:  `make repro` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: repro test demo small bench lint clean-venv

# The virtual environment, rebuilt when the dependencies change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

repro: $(VENV)/.installed  ## run the pipeline (params.yaml)
	dvc repro

# Two workers: most of a pipeline test's time is single-threaded (imports, graph tracing).
TEST_WORKERS ?= 2
test: $(VENV)/.installed  ## run the test suite
	pytest -n $(TEST_WORKERS) --dist loadgroup

demo: $(VENV)/.installed  ## all stages on generated data, in a scratch copy
	python -m retrain demo

small: $(VENV)/.installed  ## the small profile in this workspace (used by CI on pull requests)
	python -m retrain profile small
	dvc repro

bench: $(VENV)/.installed  ## benchmarks -> bench/results.md
	python bench/run_all.py

lint: $(VENV)/.installed
	ruff check src stages tests bench

clean-venv:
	rm -rf $(VENV)
