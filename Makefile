PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
RUNS ?= runs

.PHONY: demo test test-fast bench bench-throughput lint venv dev clean flower

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev,flower]'
	touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	$(VENV)/bin/fedmtl demo

# One BLAS/OpenMP thread per process: the models are small, and on a busy 2-core machine torch's
# spinning worker threads cost far more than they save.
export OMP_NUM_THREADS ?= 1

test: $(VENV)/.dev
	$(PY) -m pytest -q

# The edit loop: config, data, records, reports, the CLI in-process, lint (under 2 minutes on 2
# cores). `make test` stays the whole suite, and what CI runs.
FAST_TESTS := config records report rows partition aggregation_pipeline normalize reread lint \
	results_provenance extensions datasets algorithms readme workflow
test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow" $(FAST_TESTS:%=tests/test_%.py)

# about 41 minutes on 2 cores; `fedmtl bench --list` shows every benchmark and its duration
bench: $(VENV)/.base
	$(VENV)/bin/fedmtl bench mnist_fedavg

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks flower_app tools
	$(VENV)/bin/ruff format --check src tests benchmarks flower_app tools

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache

flower: $(VENV)/.dev
	$(VENV)/bin/fedmtl flower run examples/flower_digits.yaml

bench-throughput: $(VENV)/.dev
	$(VENV)/bin/fedmtl bench throughput
