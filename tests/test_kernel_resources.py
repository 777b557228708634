"""What decides the CUDA kernels' speed, read from the compiled sm_90 code of fusedbn._C without a GPU.

Every kernel instantiation must run without local-memory spills and keep at least 1024 threads resident
per SM at the block sizes the host side launches (csrc/cuda/kernel_basics.cuh: kMaxBlockThreads,
kMinResidentThreads): the streaming kernels hide memory latency with the threads in flight, so a kernel
that grows past 64 registers would silently halve its bandwidth. Read with `cuobjdump
--dump-resource-usage`, which torch's Linux wheel brings along in triton's package (benchmarks/sass.py;
$FUSEDBN_SASS_LIBRARY names another build).
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sass  # noqa: E402

MIN_RESIDENT_THREADS = 1024
# The host side launches reductions with up to 512 threads a block and the elementwise passes with 256.
BLOCK_SIZES = (256, 512)


def sm90_kernels() -> list[sass.Kernel]:
    try:
        library = sass.default_library()
        kernels = sass.kernels(library)
    except (FileNotFoundError, ImportError) as e:  # no triton (cuobjdump), no c++filt, no fusedbn._C
        pytest.skip(str(e))
    if not kernels:
        pytest.skip(f"{library} was built without sm_90 CUDA code (FUSEDBN_CUDA=0, or no nvcc)")
    return kernels


def test_every_family_is_compiled_for_sm90():
    names = " ".join(k.name for k in sm90_kernels())
    for family in ("channels_first_reduce_kernel", "channels_last_reduce_kernel",
                   "channels_first_elementwise_kernel", "channels_last_elementwise_kernel"):
        assert family in names


def test_no_kernel_spills():
    spilling = [(k.short_name, k.stack, k.local) for k in sm90_kernels() if k.local or k.stack]
    assert not spilling, f"kernels with stack or local memory (spills): {spilling}"


@pytest.mark.parametrize("block_threads", BLOCK_SIZES)
def test_every_kernel_keeps_1024_threads_resident(block_threads):
    starved = [(k.short_name, k.registers, k.shared, sass.blocks_per_sm(k, block_threads) * block_threads)
               for k in sm90_kernels() if sass.blocks_per_sm(k, block_threads) * block_threads < MIN_RESIDENT_THREADS]
    assert not starved, f"(kernel, registers, shared bytes, resident threads) below {MIN_RESIDENT_THREADS}: {starved}"
