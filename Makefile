# Entry points for a fresh machine with nothing but Python:
#   make test      - .venv with the pinned torch, build fusedbn, run the whole test suite
#   make bench     - same set-up, then the benchmark against nn.BatchNorm2d
#   make examples  - same set-up, then the training examples that make examples/results
#   make sdist-check - the source package installs: build the sdist, install it in a fresh venv, smoke test
#                    (`make test` runs it first; `make test SDIST_CHECK=0` skips it)
# Both are idempotent: the venv is made once, ninja rebuilds only what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
TORCH := torch==2.14.1
TORCH_PIN := $(TORCH) torchvision==0.29.1
ONNX_PIN := onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0
TORCHAO_PIN := torchao==0.18.0
TIMM_PIN := timm==1.0.26
LIBRARY_PINS := lightning==2.6.6 monai==1.6.1

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

.PHONY: test test-fast bench build clean fuzz examples sdist sdist-check wheel

$(DEPS_STAMP): Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN) $(TIMM_PIN) $(LIBRARY_PINS) $(ONNX_PIN) $(TORCHAO_PIN) ninja 'setuptools>=77' wheel build pytest hypothesis rich matplotlib scikit-learn
	touch $@

build: $(DEPS_STAMP) $(CUDA_HOME_FILE)
	CUDA_HOME=$$(cat $(CUDA_HOME_FILE)) $(PY) setup.py --quiet build_ext --inplace

# The tests also build the SIMT emulator library (fusedbn._simt), which runs the CUDA kernel source on the CPU.
test: $(if $(filter 0,$(SDIST_CHECK)),,sdist-check) $(DEPS_STAMP) $(CUDA_HOME_FILE)
	CUDA_HOME=$$(cat $(CUDA_HOME_FILE)) FUSEDBN_SIMT=1 $(PY) setup.py --quiet build_ext --inplace
	$(PY) -m pytest tests

# The edit-test loop (tests/README.md): the CPU device only, a tenth of the property-based cases, and the
# tests marked slow (processes, whole models, large tensors) left to `make test`.
test-fast: build
	FUSEDBN_TEST_DEVICES=cpu FUSEDBN_FUZZ_EXAMPLES=0.1 $(PY) -m pytest tests -q -m "not slow"

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

# The source package (MANIFEST.in says what it holds beyond fusedbn/), in build/sdist/. A fusedbn.egg-info
# left from an earlier build is removed first: setuptools would add every file its SOURCES.txt lists.
SDIST_DIR := build/sdist
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' fusedbn/_version.py)
sdist: $(DEPS_STAMP)
	rm -rf $(SDIST_DIR) *.egg-info && mkdir -p $(SDIST_DIR)
	FUSEDBN_CUDA=0 $(PY) -m build --sdist --no-isolation --outdir $(SDIST_DIR) . >build/sdist.log 2>&1 || { cat build/sdist.log; exit 1; }
	$(PY) .ci/sdist_contents.py $(SDIST_DIR)/fusedbn-$(VERSION).tar.gz

# That the sdist installs and works outside this tree: a fresh venv with the pinned torch only (from the
# package index), the sdist installed into it (one CPU build, -march=native, no CUDA, to stay quick: ~4 min on
# 2 cores), then .ci/sdist_smoke.py and `python -m fusedbn` (a new user's first command) run from an empty
# folder elsewhere. A file the build needs but missing from the sdist (MANIFEST.in) fails here.
# --no-build-isolation: an isolated build would install torch a second time.
SDIST_VENV := build/sdist-venv
sdist-check: sdist
	@start=$$(date +%s); set -e; \
	rm -rf $(SDIST_VENV); \
	$(PYTHON) -m venv $(SDIST_VENV); \
	$(SDIST_VENV)/bin/python -m pip install -qq $(TORCH) numpy ninja 'setuptools>=77' wheel; \
	echo "fusedbn: sdist-check: venv with $(TORCH) in $$(( $$(date +%s) - start )) s, building the sdist into it"; \
	smoke=$$(mktemp -d); cd $$smoke; \
	FUSEDBN_CUDA=0 FUSEDBN_CPU_ARCH=native $(CURDIR)/$(SDIST_VENV)/bin/python -m pip install -qq --no-build-isolation \
	  $(CURDIR)/$(SDIST_DIR)/fusedbn-$(VERSION).tar.gz; \
	$(CURDIR)/$(SDIST_VENV)/bin/python $(CURDIR)/.ci/sdist_smoke.py $(VERSION); \
	$(CURDIR)/$(SDIST_VENV)/bin/python -m fusedbn; \
	cd $(CURDIR); rm -rf $$smoke $(SDIST_VENV); \
	echo "fusedbn: sdist-check passed in $$(( $$(date +%s) - start )) s"

# A wheel of this tree into build/wheels (as `make build`: CUDA when found, the CPU kernels for this machine;
# FUSEDBN_CPU_ARCH= for the portable set, see setup.py).
wheel: $(DEPS_STAMP) $(CUDA_HOME_FILE)
	CUDA_HOME=$$(cat $(CUDA_HOME_FILE)) $(PY) -m pip wheel --no-build-isolation --no-deps . -w build/wheels

clean:
	rm -rf build fusedbn/*.so
