# loraburst developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
TORCH_VERSION ?= 2.13.0
# A CUDA GPU is present when nvidia-smi lists one; otherwise install the CPU build of torch
# instead of a multi-GB CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test test-fast lint format mypy bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
else
	@# A local wheel of the CPU build first (some machines carry one), then PyTorch's CPU index.
	$(PIP) install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
	  && $(PIP) install -q "torch==$(TORCH_VERSION)" \
	  || $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) \
	       --extra-index-url https://pypi.org/simple
endif
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -q -c constraints.txt -e ".[train,dev]" --config-settings editable_mode=strict
	touch $@

install: $(VENV)/.installed  ## create .venv and install loraburst with the trainer and dev tools

demo: install  ## run the quickstart: a tiny model trained with NF4 QLoRA on this machine
	$(BIN)/python examples/quickstart.py

test: install  ## the whole suite, as CI runs it
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check sdk providers remote tests examples benchmarks
	$(BIN)/ruff format --check sdk providers remote tests examples benchmarks

format: install
	$(BIN)/ruff format sdk providers remote tests examples benchmarks
	$(BIN)/ruff check --fix sdk providers remote tests examples benchmarks

mypy: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
