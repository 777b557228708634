#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool's H200), within 8 minutes: build fusedbn with the
# machine's own torch (and, beside it, the previous kernels), the kernels' registers and spills, every
# CUDA test, compute-sanitizer memcheck and racecheck over a slice of them, ncu's DRAM throughput and
# stall reasons per kernel at 256x256x56x56, the benchmark against
# nn.BatchNorm2d at ResNet-50 shapes (batch 256: both layouts, bfloat16 and float32, float16 on a few
# shapes, CUDA-graph replay at the small-spatial shapes, BN+Add+ReLU against torch.compile), the previous
# kernels on the same shapes, torch.profiler timelines of one training step and one eval call, and
# ResNet-50 under bf16 autocast. Everything lands in $OUT (default benchmarks/results/gpu); commit it under
# benchmarks/results/<gpu>/ and regenerate the README table from it (benchmarks/README.md).
#
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh
#
# The previous kernels come as a source archive of the last commit measured on a GPU, made here and carried
# to the machine (an ignored path, so the device tool's `carry` takes it):
#   git archive -o build/prev-src.tar ede88ac   # the kernels measured on the H100 (benchmarks/results/h100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PREV_TAR=${PREV_TAR:-build/prev-src.tar}
PREV_DIR=/tmp/fusedbn-prev
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FUSEDBN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
# The whole run stays within 8 minutes: each step gets at most its own limit and what is left; a step with
# less than 5 s left is skipped (the steps come in the order of what the GPU issue needs most).
DEADLINE=$((SECONDS + ${BUDGET_S:-470}))
cap() { local left=$((DEADLINE - SECONDS)); echo $(( $1 < left ? $1 : (left > 5 ? left : 1) )); }
step() { echo "== $(date +%T) $* ($((DEADLINE - SECONDS)) s left)" | tee -a "$OUT/steps.log"; }
bench() {  # bench NAME TIMEOUT ARGS...: benchmarks/bench.py at batch 256 into $OUT/bench-NAME.{txt,json}
  local name=$1 limit=$2
  shift 2
  PYTHONPATH=${BENCH_PYTHONPATH:-.} timeout "$(cap "$limit")" python3 benchmarks/bench.py --device cuda --batch 256 \
    --min-run-time 0.06 --json "$OUT/bench-$name.json" "$@" > "$OUT/bench-$name.txt" 2>&1
  echo "bench $name rc=$?" | tee -a "$OUT/steps.log"
}

step machine
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"; } > "$OUT/machine.txt" 2>&1

step "build (and the previous kernels beside it)"
prev_build=
if [ -f "$PREV_TAR" ]; then
  rm -rf "$PREV_DIR" && mkdir -p "$PREV_DIR" && tar -xf "$PREV_TAR" -C "$PREV_DIR"
  (cd "$PREV_DIR" && python3 setup.py build_ext --inplace) > "$OUT/build-prev.log" 2>&1 &
  prev_build=$!
fi
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi

# The extension's C++ exceptions need the libstdc++ of the compiler that built it; a Python that loads an
# older one first crashes on them (seen on the lent H100: benchmarks/results/h100/README.md).
if [ -n "${CXX:-}" ]; then
  export LD_PRELOAD="$($CXX -print-file-name=libstdc++.so.6)${LD_PRELOAD:+:$LD_PRELOAD}"
fi

step "registers and spills"
CUOBJDUMP=$(command -v cuobjdump || python3 -c "import triton, os; print(os.path.join(triton.__path__[0], 'backends/nvidia/bin/cuobjdump'))")
"$CUOBJDUMP" --dump-resource-usage fusedbn/_C*.so > "$OUT/resource-usage.txt" 2>&1
timeout "$(cap 30)" python3 -m pytest tests/test_kernel_resources.py -q -p no:cacheprovider -o addopts="" > "$OUT/kernel-resources.log" 2>&1
echo "kernel resources rc=$?" | tee -a "$OUT/steps.log"

# Every ResNet-50 shape against eager nn.BatchNorm2d. The JSON is rewritten after each shape: a run cut
# short keeps what it measured.
step "benchmark bfloat16, float32, float16"
bench bfloat16 60 --dtype bfloat16 --shapes resnet50 --workload bn
bench float32 60 --dtype float32 --shapes resnet50 --workload bn
bench float16 25 --dtype float16 --workload bn --shapes "256,256,56,56;256,2048,7,7"
step "benchmark under CUDA-graph replay (the kernels without the host's launch overhead)"
bench graph-bfloat16 30 --dtype bfloat16 --workload bn --shapes "256,1024,14,14;256,2048,7,7" --cuda-graph
step "benchmark BN+Add+ReLU against torch.compile"
bench compile-bfloat16 70 --dtype bfloat16 --workload bn+add+relu --shapes "256,256,56,56;256,2048,7,7" --compare eager,compile
if [ -n "$prev_build" ]; then
  step "the previous kernels ($PREV_TAR) on the same shapes"
  if wait "$prev_build"; then
    BENCH_PYTHONPATH=$PREV_DIR bench prev-bfloat16 50 --dtype bfloat16 --shapes resnet50 --workload bn
  else
    echo "previous build failed" | tee -a "$OUT/steps.log"
  fi
fi

step "CUDA tests"
timeout "$(cap 120)" python3 -m pytest tests -q --maxfail=15 -k cuda -p no:cacheprovider -o addopts="" -rs > "$OUT/pytest-cuda.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/steps.log"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-cuda.log" | tail -20

# 20x2x64x64 splits each channel over many blocks (the grid merge and its self-resetting counters).
SLICE='cuda and default and float32-params-float32 and (4x6x9x11 or 2x1000x2x1 or 20x2x64x64)'
step memcheck
timeout "$(cap 45)" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_equivalence.py \
  -q -x -p no:cacheprovider -o addopts="" -k "$SLICE and contiguous" > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/steps.log"
step racecheck
timeout "$(cap 45)" compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest tests/test_equivalence.py \
  -q -x -p no:cacheprovider -o addopts="" -k "$SLICE and channels_last" > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?" | tee -a "$OUT/steps.log"
tail -n 3 "$OUT/memcheck.log" "$OUT/racecheck.log"

# Whether the kernels' causes of slowness are gone (issue 28): DRAM throughput, warps active, the long-
# scoreboard stall (waiting on memory: too few loads in flight) and instructions issued, per kernel, for one
# training step and one eval call at 256x256x56x56 in bf16 and fp32, both layouts.
step "ncu at 256x256x56x56"
timeout "$(cap 60)" ncu --csv --kernel-name regex:fusedbn --metrics \
  dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio,smsp__inst_executed.sum,launch__grid_size,launch__occupancy_limit_registers \
  python3 -c "
import torch, fusedbn
for dtype in (torch.bfloat16, torch.float32):
    for fmt in (torch.contiguous_format, torch.channels_last):
        bn = fusedbn.FusedBatchNorm2d(256).cuda()
        x = torch.randn(256, 256, 56, 56, device='cuda', dtype=dtype).to(memory_format=fmt).requires_grad_()
        bn(x).backward(torch.ones_like(x))
        with torch.no_grad():
            bn.eval()(x)
torch.cuda.synchronize()
" > "$OUT/ncu-256x256x56x56.csv" 2>&1
echo "ncu rc=$?" | tee -a "$OUT/steps.log"

step "profiler timelines"
PYTHONPATH=. timeout "$(cap 30)" python3 benchmarks/profile_step.py --device cuda --dtype bfloat16 --layout nhwc \
  --out "$OUT/profiles" > "$OUT/profiles.txt" 2>&1
echo "profiles rc=$?" | tee -a "$OUT/steps.log"

step "resnet50, bf16 autocast, channels_last, batch 256"
PYTHONPATH=. timeout "$(cap 120)" python3 benchmarks/resnet.py --device cuda --batch 256 --channels-last --fuse \
  --autocast bfloat16 --compile --steps 2 --min-run-time 1.0 > "$OUT/resnet50.txt" 2>&1
echo "resnet50 rc=$?" | tee -a "$OUT/steps.log"
step done
