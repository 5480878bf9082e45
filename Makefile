# The README's commands.  Each target creates (or reuses) the virtual environment in .venv and
# installs what it needs, so a fresh clone needs nothing else than python3 (>= 3.10) and make.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vqref-installed
ARGS   ?=

.PHONY: demo test test-fast bench gpu-test notebooks clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

## make demo: the main job (see README)
demo: $(STAMP)
	$(PY) -m vqref demo $(ARGS)

# Two pytest workers with one BLAS thread each: two workers with two BLAS threads apiece on a
# 2-core machine oversubscribe it and make small matrix products 100x slower.
TEST_ENV := OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg

## make test: the whole suite (torch cross-checks, conformance, notebooks) on 2 cores
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -p no:cacheprovider $(ARGS)

## make test-fast: the library tests without notebooks
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -p no:cacheprovider --ignore=notebooks $(ARGS)

## make bench: the CPU benchmarks against the peers (prints a table, writes reports/bench.*)
bench: $(STAMP)
	$(PY) -m vqref bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis reports
