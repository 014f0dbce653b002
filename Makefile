# lora-dist: the two quick-start commands, and the setup they share.
#   make train   set up .venv and fine-tune GPT-2 small on the SMS data (configs/gpt2-small-lora.yaml, the recommended recipe)
#   make test    set up .venv with the test extras and run the tests (make test-fast: the quick ones; make lint)
# On a machine whose Python already has a CUDA build of torch:  make train USE_SYSTEM_TORCH=1
# Another torch build:  make train TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
USE_SYSTEM_TORCH ?= 0
CONFIG ?= configs/gpt2-small-lora.yaml
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers: one more than the cores, since the Docker, Slurm and signal tests spend much of their time
# waiting on daemons and disk (2 cores: 516-543 s with 3 workers, 567 s with 2); 0 runs the tests in this process.
# Each test file runs whole on one worker.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

BIN := $(VENV)/bin
STAMP := $(VENV)/.lora-dist-installed
# pip install -e: setuptools' ten-line note that an editable install is one ("Editable installation ... be careful
# with folders named like the package") is informational; nothing else of the build is hidden.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e

.PHONY: setup setup-dev train smoke test test-fast lint clean

$(BIN)/python:
ifeq ($(USE_SYSTEM_TORCH),1)
	$(PYTHON) -c "import torch; print('using the installed torch', torch.__version__, 'cuda', torch.version.cuda)"
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
endif
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: a later unpinned "torch>=..." is then already satisfied, so pip never fetches
# a multi-GB CUDA build by accident.
$(STAMP): $(BIN)/python pyproject.toml
ifneq ($(USE_SYSTEM_TORCH),1)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
endif
	$(EDITABLE) ".[wandb,serve,deepspeed]"
	touch $@

$(STAMP)-dev: $(STAMP)
	$(EDITABLE) ".[dev,serve]"
	touch $@

setup: $(STAMP)

setup-dev: $(STAMP)-dev

train: setup
	$(BIN)/lora-dist train --config $(CONFIG) $(ARGS)

smoke: setup
	$(BIN)/lora-dist train --config configs/smoke.yaml output_dir=runs/smoke overwrite=true $(ARGS)

test: setup-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The tests not marked slow (no multi-process, DeepSpeed, Docker, Slurm or benchmark runs): under 2 minutes
# on 2 cores, for the edit-test loop. `make test` runs everything, as CI does.
test-fast: setup-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# ruff (lint and format check) and mypy, configured in pyproject.toml; `$(BIN)/ruff format .` fixes the format.
lint: setup-dev
	$(BIN)/ruff check lora_dist tests bench launcher
	$(BIN)/ruff format --check lora_dist tests bench launcher
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
