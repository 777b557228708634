# Entry points for a fresh machine with nothing but Python:
#   make test      - .venv with the pinned torch, build fusedbn, run the whole test suite
#   make bench     - same set-up, then the benchmark against nn.BatchNorm2d
#   make examples  - same set-up, then the training examples that make examples/results
# Both are idempotent: the venv is made once, ninja rebuilds only what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
TIMM_PIN := timm==1.0.26

CUDA_HOME_FILE := $(VENV)/.cuda-home
CUDA_PIN := nvidia-cuda-nvcc==13.0.* nvidia-cuda-crt==13.0.* nvidia-nvvm==13.0.* nvidia-cuda-cccl==13.0.*

# This build serves this machine only, so the CPU kernels may use all of its instructions (setup.py).
export FUSEDBN_CPU_ARCH ?= native

# The CUDA kernels are always compiled (sm_80 and sm_90, see setup.py). CUDA_HOME is the machine's
# toolkit (/usr/local/cuda, or the one holding the nvcc on PATH; torch would guess /usr/local when nvcc is
# a wrapper script there); without any, CUDA 13's compiler comes from PyPI into the venv, laid out as
# torch's build expects a toolkit (lib64/, an unversioned libcudart.so).
$(CUDA_HOME_FILE): $(DEPS_STAMP)
	@if [ -n "$${CUDA_HOME:-}" ] && [ -x "$$CUDA_HOME/bin/nvcc" ]; then echo "$$CUDA_HOME"; \
	elif [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; \
	elif command -v nvcc >/dev/null && [ -x "$$(dirname "$$(readlink -f "$$(command -v nvcc)")")/nvcc" ] \
	     && [ -d "$$(dirname "$$(dirname "$$(readlink -f "$$(command -v nvcc)")")")/include" ]; then \
	  dirname "$$(dirname "$$(readlink -f "$$(command -v nvcc)")")"; \
	else $(PY) -m pip install --quiet $(CUDA_PIN) >&2 && \
	  home=$$($(PY) -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))") && \
	  ln -sf libcudart.so.13 "$$home/lib/libcudart.so" && { [ -e "$$home/lib64" ] || ln -s lib "$$home/lib64"; } && \
	  echo "$$home"; fi > $@.tmp
	mv $@.tmp $@
	@echo "fusedbn: CUDA_HOME=$$(cat $@)"

.PHONY: test bench build clean fuzz examples

$(DEPS_STAMP): Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN) $(TIMM_PIN) ninja pybind11 setuptools wheel pytest hypothesis rich matplotlib scikit-learn
	touch $@

build: $(DEPS_STAMP) $(CUDA_HOME_FILE)
	CUDA_HOME=$$(cat $(CUDA_HOME_FILE)) $(PY) setup.py --quiet build_ext --inplace

# The tests also build the SIMT emulator library (fusedbn._simt), which runs the CUDA kernel source on the CPU.
test: $(DEPS_STAMP) $(CUDA_HOME_FILE)
	CUDA_HOME=$$(cat $(CUDA_HOME_FILE)) FUSEDBN_SIMT=1 $(PY) setup.py --quiet build_ext --inplace
	$(PY) -m pytest tests

# The property-based tests with 20x the cases of a CI run (tests/test_fuzz.py).
fuzz: $(DEPS_STAMP) $(CUDA_HOME_FILE)
	CUDA_HOME=$$(cat $(CUDA_HOME_FILE)) FUSEDBN_SIMT=1 $(PY) setup.py --quiet build_ext --inplace
	FUSEDBN_FUZZ_EXAMPLES=20 $(PY) -m pytest tests/test_fuzz.py -s

# A summary line per row (fusedbn/torch, % of roofline, spread); the full table in bench-table.txt.
bench: build
	PYTHONPATH=. $(PY) benchmarks/bench.py --quick --full-table bench-table.txt

# examples/results as committed: training curves, the learning-rate sweep, the loss landscape (CPU: minutes).
examples: build
	PYTHONPATH=. $(PY) examples/train.py
	PYTHONPATH=. $(PY) examples/train.py --dtype float64 --norm fusedbn,torch
	PYTHONPATH=. $(PY) examples/train.py --model mlp --lr 0.5
	PYTHONPATH=. $(PY) examples/lr_sweep.py
	PYTHONPATH=. $(PY) examples/landscape.py

clean:
	rm -rf build fusedbn/*.so
