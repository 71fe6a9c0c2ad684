# Quick start:  make demo   (install + run the end-to-end demo)
#               make test   (install + run the whole test suite: unit, Triton interpreter, CUDA compile check)
# A local virtual environment in .venv; stamps make a second run skip what has not changed.
# The venv sees system site-packages so a machine that already has torch (e.g. a CUDA build) keeps it;
# torch==$(TORCH_VERSION) is installed only when no torch is importable.

PYTHON        ?= python3
VENV          ?= .venv
BIN           := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
MAX_JOBS      ?= 2
export MAX_JOBS

EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc csrc/cuda/*.cu csrc/cuda/*.cuh)
TEST_DEPS   := pytest expecttest ruff numpy transformers==4.46.3

.PHONY: demo test test-unit test-triton check-compile lint install clean

demo: $(VENV)/.stamp-build
	$(BIN)/sparsekit demo

test: test-unit test-triton check-compile

test-unit: $(VENV)/.stamp-build $(VENV)/.stamp-test
	$(BIN)/python -m pytest tests -q -m "not triton"

test-triton: $(VENV)/.stamp-build $(VENV)/.stamp-test
	$(BIN)/python -m pytest tests -q -m triton --triton-interpret

check-compile: $(VENV)/.stamp-build
	$(BIN)/python scripts/check_compile.py

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check .

install: $(VENV)/.stamp-build

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch only if none is importable (never replaces an installed torch); triton for the interpreter tests
$(VENV)/.stamp-deps: $(BIN)/python Makefile
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q "triton==$(TRITON_VERSION)"
	$(BIN)/python -m pip install -q numpy safetensors ninja setuptools wheel
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(EXT_SOURCES) pyproject.toml
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-deps Makefile
	$(BIN)/python -m pip install -q $(TEST_DEPS)
	touch $@

clean:
	rm -rf build sparsekit/_C*.so *.egg-info
