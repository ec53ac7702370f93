# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv on first use, trains on the bundled Shakespeare, prints a sample
#   make test    creates .venv on first use, runs the unit tests and the parity tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKEND ?= jax

.PHONY: train test lint format side-by-side clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 first: a CPU build where one is on disk; otherwise PyPI's default build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/python train.py --backend=$(BACKEND)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests parity

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

side-by-side: $(BIN)/.installed
	$(BIN)/python -m parity.side_by_side

clean:
	rm -rf $(VENV) out data
