# Every target does its own set-up on a fresh machine (CPU only, no GPU, no network but PyPI).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so the CPU install takes the small CPU wheel.
TORCH_CPU ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all proto clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_CPU)"
	$(BIN)/pip install -q -e ".[test,plot,dev]" "$(TORCH_CPU)"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/opd demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Regenerate the Python message module from proto/ (the generated file is committed).
proto: setup
	$(BIN)/python -m teacher_server.wire.gen

clean:
	rm -rf $(VENV) .pytest_cache
