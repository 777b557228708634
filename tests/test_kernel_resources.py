"""What decides the CUDA kernels' speed, read from the compiled sm_90 code of fusedbn._C without a GPU.

Every kernel instantiation must run without local-memory spills and keep at least 1024 threads resident
per SM at the block sizes the host side launches (csrc/cuda/kernels.cuh: kMaxBlockThreads,
kMinResidentThreads): the streaming kernels hide memory latency with the threads in flight, so a kernel
that grows past 64 registers would silently halve its bandwidth. Read with `cuobjdump
--dump-resource-usage`, which torch's Linux wheel brings along in triton's package.
"""
import dataclasses
import importlib.util
import pathlib
import re
import subprocess

import pytest

import fusedbn

# Hopper (sm_90) per SM: 64K 32-bit registers, allocated per warp in units of 256; 64 warps; 32 blocks;
# 228 KB of shared memory, 1 KB of it reserved per block.
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024

MIN_RESIDENT_THREADS = 1024
# The host side launches reductions with up to 512 threads a block and the elementwise passes with 256.
BLOCK_SIZES = (256, 512)


@dataclasses.dataclass
class KernelResources:
    name: str
    registers: int
    stack: int
    shared: int
    local: int

    def resident_threads(self, block_threads: int) -> int:
        warps = block_threads // 32
        per_warp = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        by_registers = (REGISTERS_PER_SM // per_warp) // warps
        by_shared = SHARED_PER_SM // (self.shared + SHARED_RESERVED_PER_BLOCK)
        blocks = min(by_registers, by_shared, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps)
        return blocks * block_threads


def cuobjdump() -> pathlib.Path:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("triton (which ships cuobjdump) is not installed")
    tool = pathlib.Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"no cuobjdump at {tool}")
    return tool


def sm90_kernels() -> list[KernelResources]:
    library = pathlib.Path(fusedbn._C.__file__)
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", str(library)], capture_output=True, text=True).stdout
    kernels, arch, name = [], None, None
    for line in out.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif arch == "sm_90" and name and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            kernels.append(KernelResources(name, *map(int, m.groups())))
            name = None
    if not kernels:
        pytest.skip("fusedbn._C was built without sm_90 CUDA code (FUSEDBN_CUDA=0, or no nvcc)")
    return kernels


def test_every_family_is_compiled_for_sm90():
    names = " ".join(k.name for k in sm90_kernels())
    for family in ("channels_first_reduce_kernel", "channels_last_reduce_kernel",
                   "channels_first_elementwise_kernel", "channels_last_elementwise_kernel"):
        assert family in names


def test_no_kernel_spills():
    spilling = [(k.name, k.stack, k.local) for k in sm90_kernels() if k.local or k.stack]
    assert not spilling, f"kernels with stack or local memory (spills): {spilling}"


@pytest.mark.parametrize("block_threads", BLOCK_SIZES)
def test_every_kernel_keeps_1024_threads_resident(block_threads):
    starved = [(k.name, k.registers, k.shared, k.resident_threads(block_threads))
               for k in sm90_kernels() if k.resident_threads(block_threads) < MIN_RESIDENT_THREADS]
    assert not starved, f"(kernel, registers, shared bytes, resident threads) below {MIN_RESIDENT_THREADS}: {starved}"
