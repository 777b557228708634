#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool), within about 7 minutes: build fusedbn with
# the machine's own torch, run every CUDA test, compute-sanitizer memcheck and racecheck over a slice of
# them, and the benchmark against nn.BatchNorm2d at ResNet-50 shapes (batch 256). Everything lands in
# $OUT (default benchmarks/results/gpu); commit it under benchmarks/results/.
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FUSEDBN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }

step machine
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"; } > "$OUT/machine.txt" 2>&1

step build
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi

# The extension's C++ exceptions need the libstdc++ of the compiler that built it; a Python that loads an
# older one first crashes on them (seen on the lent H100: benchmarks/results/h100/README.md).
if [ -n "${CXX:-}" ]; then
  export LD_PRELOAD="$($CXX -print-file-name=libstdc++.so.6)${LD_PRELOAD:+:$LD_PRELOAD}"
fi

step "CUDA tests"
timeout 240 python3 -m pytest tests -q --maxfail=15 -k cuda -p no:cacheprovider -o addopts="" -rs > "$OUT/pytest-cuda.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/steps.log"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-cuda.log" | tail -20

SLICE='cuda and default and float32-params-float32 and (4x6x9x11 or 2x1000x2x1 or 20x2x64x64)'
step memcheck
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_equivalence.py \
  -q -x -p no:cacheprovider -o addopts="" -k "$SLICE and contiguous" > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/steps.log"
step racecheck
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest tests/test_equivalence.py \
  -q -x -p no:cacheprovider -o addopts="" -k "$SLICE and channels_last" > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?" | tee -a "$OUT/steps.log"
tail -n 3 "$OUT/memcheck.log" "$OUT/racecheck.log"

# Every ResNet-50 shape against eager nn.BatchNorm2d, then a few against torch.compile's too (each shape
# compiles afresh). The JSON is rewritten after each shape: a run cut short keeps what it measured.
for dtype in bfloat16 float32; do
  step "benchmark $dtype"
  PYTHONPATH=. timeout 120 python3 benchmarks/bench.py --device cuda --batch 256 --dtype "$dtype" \
    --shapes resnet50 --min-run-time 0.06 \
    --json "$OUT/bench-$dtype.json" --csv "$OUT/bench-$dtype.csv" > "$OUT/bench-$dtype.txt" 2>&1
  echo "bench $dtype rc=$?" | tee -a "$OUT/steps.log"
done
step "benchmark with torch.compile"
PYTHONPATH=. timeout 150 python3 benchmarks/bench.py --device cuda --batch 256 --dtype bfloat16 --shapes small \
  --compare eager,compile --min-run-time 0.06 --json "$OUT/bench-compile-bfloat16.json" \
  > "$OUT/bench-compile-bfloat16.txt" 2>&1
echo "bench compile rc=$?" | tee -a "$OUT/steps.log"
step "resnet50"
PYTHONPATH=. timeout 90 python3 benchmarks/resnet.py --device cuda > "$OUT/resnet50.txt" 2>&1
echo "resnet50 rc=$?" | tee -a "$OUT/steps.log"
step done
