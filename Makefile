# Every target does its own set-up on a fresh machine (CPU only, no GPU, no network but PyPI).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject). On a plain package index this pin resolves to the CUDA
# build on Linux x86_64 (several GB of CUDA wheels); TORCH_INDEX=<PyTorch's CPU wheel index URL>
# installs the small CPU-only build instead. Left empty, the default index decides.
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_INDEX_FLAG := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup prereqs demo test test-all proto clean sglang-reference

# A C++ compiler, OpenMP and the Python headers (DeepSpeed compiles its CPU Adam on first use):
# checked before anything is installed, with one line saying what to install.
prereqs:
	@$(PY) -m opd.prereqs

$(BIN)/.installed: pyproject.toml
	@$(PY) -m opd.prereqs
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX_FLAG) "$(TORCH_CPU)"
	$(BIN)/pip install -q $(TORCH_INDEX_FLAG) -e ".[test,plot,dev]" "$(TORCH_CPU)"
	touch $@

setup: $(BIN)/.installed

demo: setup prereqs
	$(BIN)/opd demo $(DEMO_ARGS)

test: setup prereqs
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup prereqs
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# SGLang 0.5.23's own request/response classes for tests/test_rollout_sglang_semantics.py: its pure-
# Python wheel (pip download --no-deps, from PyPI) unpacked into $$OPD_SGLANG_CACHE (default
# ~/.cache/opd/sglang-0.5.23). The test does the same on first use; this target does it ahead.
sglang-reference: setup
	$(BIN)/python -c "from tests.sglang_reference import ensure_source; print(ensure_source())"

# Regenerate the Python message module from proto/ (the generated file is committed).
proto: setup
	$(BIN)/python -m teacher_server.wire.gen

clean:
	rm -rf $(VENV) .pytest_cache
