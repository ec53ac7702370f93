# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv on first use, trains on the bundled Shakespeare, prints a sample
#   make test    creates .venv on first use, runs the unit tests and the parity tests
# make train BACKEND=torch trains the same run in PyTorch; ARGS='...' passes options and overrides
# to train.py (ARGS='train.max_steps=100 run.name=quick').
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKEND ?= jax
ARGS ?=
# make train's run: configs/shakespeare.toml's runs are named shakespeare-<backend>.
RUN := out/shakespeare-$(BACKEND)
# ARGS that name another run, preset or backend, or --resume, leave the choice of run to train.py.
OTHER_RUN := $(strip $(foreach word,run. --config --backend --resume,$(findstring $(word),$(ARGS))))

.PHONY: train test lint format side-by-side clean distclean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 first: a CPU build where one is on disk; otherwise PyPI's default build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# A second `make train` continues the run it made (a finished run is only sampled).
RESUME = $(if $(OTHER_RUN),,$(if $(wildcard $(RUN)/model.safetensors),--resume))
CONTINUING := $(RUN) already holds a run, so this continues it (--resume; a finished run is only \
	sampled). make train ARGS=run.name=NAME trains another; make clean deletes out/.
train: $(BIN)/.installed
	$(if $(RESUME),@echo "$(CONTINUING)")
	$(BIN)/python train.py --backend=$(BACKEND) $(RESUME) $(ARGS)

# Two or more workers (pytest-xdist): most tests start processes that compile, one core each.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 tests parity

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

side-by-side: $(BIN)/.installed
	$(BIN)/python -m parity.side_by_side

# clean deletes the runs and the prepared data; distclean also the virtualenv.
clean:
	rm -rf out data

distclean: clean
	rm -rf $(VENV)
