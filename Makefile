# Two entry points (see README): `make demo` and `make test`. Each builds .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

# torch is pinned and installed first: an unpinned resolve pulls a multi-GB build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole path on one machine: tokenize the stdlib corpus with Ray Data, train a small RMFA LM with
# 2 DeepSpeed workers under Ray Train (MLflow store: ./mlflow.db), print the comparison of the demo's
# runs, then measure RMFA's approximation error.
demo: $(STAMP)
	$(BIN)/macformer prepare --input stdlib --output data/stdlib --seq-len 1024 --vocab-size 8000 --valid-fraction 0.05
	$(BIN)/macformer train --config configs/demo.yaml run_name=demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/macformer compare --experiment macformer-demo
	$(BIN)/python -m benchmarks.approximation_error --kernels exp inverse log sqrt --dims 16 64 256 1024

# pytest exits 5 when it collects nothing: a test run that tests nothing must not pass.
# The project's bytecode is written once here: some machines set PYTHONDONTWRITEBYTECODE, and then each
# of the suite's processes (Ray workers, CLI runs) would compile every module it imports from source.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m compileall -q macformer launcher pipelines benchmarks
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
