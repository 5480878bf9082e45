# The README's commands.  Each target creates (or reuses) the virtual environment in .venv and
# installs what it needs, so a fresh clone needs nothing else than python3 (>= 3.10) and make.
# `make help` lists the targets: every `## make TARGET: text` line below.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

# One stamp per extra, so that `make demo` on a fresh clone installs the `demo` extra only (no
# torch) and a later `make test` still installs the `test` extra.  `test` holds everything in
# `demo` (tests/test_packaging.py checks it), so installing it also satisfies the demo stamp.
DEMO_STAMP := $(VENV)/.vqref-demo
TEST_STAMP := $(VENV)/.vqref-test
GPU_STAMP  := $(VENV)/.vqref-gpu

.DEFAULT_GOAL := help
.PHONY: help demo test test-fast notebooks notebooks-refresh gpu-test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[demo]"
	@touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@ $(DEMO_STAMP)

$(GPU_STAMP): pyproject.toml $(TEST_STAMP)
	$(PY) -m pip install --quiet -e ".[test,gpu]"
	@touch $@

## make help: this list
help:
	@awk '/^## make [a-z-]+:/ { line = substr($$0, 9); i = index(line, ":"); \
		printf "  make %-10s %s\n", substr(line, 1, i - 1), substr(line, i + 2) }' $(MAKEFILE_LIST)
	@echo "  (options for a target's command go in ARGS, e.g. make demo ARGS=--quick)"

## make demo: the main job: train VQ-VAEs on real digits, write reports/demo/ (demo extra only, no torch)
demo: $(DEMO_STAMP)
	$(PY) -m vqref demo $(ARGS)

# Two pytest workers with one BLAS thread each: two workers with two BLAS threads apiece on a
# 2-core machine oversubscribe it and make small matrix products 100x slower.
TEST_ENV := OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg

## make test: the whole suite (torch cross-checks, conformance, notebooks) on 2 cores
test: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -p no:cacheprovider $(ARGS)

## make test-fast: the library tests without notebooks
test-fast: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -p no:cacheprovider --ignore=tests/test_notebooks.py $(ARGS)

## make notebooks: execute every notebook from scratch and compare it with its committed outputs
notebooks: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -p no:cacheprovider tests/test_notebooks.py $(ARGS)

## make notebooks-refresh: execute the notebooks and write their outputs in place (ARGS=notebooks/06_*.ipynb: some)
notebooks-refresh: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m tests.refresh_notebooks $(ARGS)

## make gpu-test: the backend tests on cupy (needs a CUDA GPU; installs the gpu extra)
gpu-test: $(GPU_STAMP)
	$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider -m gpu tests $(ARGS)

## make bench: the CPU benchmarks against the peers (prints a table, writes reports/bench.*)
bench: $(TEST_STAMP)
	$(PY) -m benchmarks.bench $(ARGS)

## make lint: ruff check and ruff format --check (changes nothing)
lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## make clean: remove the virtual environment and what the commands wrote
clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache reports
