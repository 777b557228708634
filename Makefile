# Two entry points for a fresh machine with nothing but Python:
#   make test   - .venv with the pinned torch, build fusedbn, run the whole test suite
#   make bench  - same set-up, then the benchmark against nn.BatchNorm2d
# Both are idempotent: the venv is made once, ninja rebuilds only what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

# torch guesses /usr/local when nvcc is a wrapper in /usr/local/bin; point it at the real toolkit.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

# This build serves this machine only, so the CPU kernels may use all of its instructions (setup.py).
export FUSEDBN_CPU_ARCH ?= native

.PHONY: test bench build clean

$(DEPS_STAMP): Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN) ninja pybind11 setuptools wheel pytest hypothesis rich
	touch $@

build: $(DEPS_STAMP)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest tests

bench: build
	PYTHONPATH=. $(PY) benchmarks/bench.py

clean:
	rm -rf build fusedbn/*.so
