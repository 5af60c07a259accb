# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: install demo lint test test-all reliability bench gpu-check clean

$(BIN)/mpm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,cluster]'
	touch $(BIN)/mpm

install: $(BIN)/mpm

demo: install
	$(BIN)/mpm demo --out $(OUT)

# the habits that keep the layout (README, Contributing): lint, format, and the layer contract
lint: install
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

# docs/reliability.md: the bad-input, fault and interrupt cases, written by the suite itself
reliability: install
	MPM_RELIABILITY_DOC=docs/reliability.md $(BIN)/python -m pytest -m reliability -q

# the one prepared device check (issue 15): gpu-marked tests and GPU benchmarks in <= 8 min; without CUDA it
# says so in one line and exits 0. No install step: a GPU machine may have no network (docs/performance.md)
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) out
