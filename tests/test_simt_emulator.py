"""The SIMT emulator (csrc/simt/simt.h) runs CUDA-style kernels on CPU threads. Its self-test kernels
(csrc/simt/selftest.cpp) are built here as a small extension and checked against Python references."""
import math
import pathlib
import time

import pytest
import torch

pytestmark = pytest.mark.slow  # builds its own extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
WARP = 32


@pytest.fixture(scope="module")
def ops():
    from torch.utils.cpp_extension import load

    load(
        name="_simt_selftest",
        sources=[str(ROOT / "csrc" / "simt" / "selftest.cpp")],
        extra_cflags=["-O1", "-std=c++20"],
        is_python_module=True,
        verbose=False,
    )
    return torch.ops.fusedbn_simt_selftest


@pytest.mark.parametrize("block_threads", [32, 64, 256, 1024])
def test_block_sum_matches_torch_over_several_blocks(ops, block_threads):
    x = torch.randn(10007, generator=torch.Generator().manual_seed(block_threads))
    total, partials = ops.block_sum(x, block_threads)
    chunk = 4 * block_threads
    assert partials.numel() == math.ceil(x.numel() / chunk) > 1
    expected = torch.stack([c.double().sum() for c in x.split(chunk)])
    torch.testing.assert_close(partials.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total.double(), x.double().sum().reshape(1), rtol=1e-5, atol=1e-3)


def test_block_sum_of_nothing(ops):
    total, partials = ops.block_sum(torch.empty(0), 64)
    assert total.item() == 0 and partials.tolist() == [0.0]


def test_barrier_orders_shared_memory(ops):
    x = torch.arange(1, 65, dtype=torch.float32)
    expected = x.sum().item()
    for _ in range(3):
        assert ops.racy_sum(x, True).item() == expected
    # Without the barrier thread 0 reads before the (deliberately slow) writers: real concurrency.
    assert any(ops.racy_sum(x, False).item() != expected for _ in range(5))


def shuffle_reference(x, kind, arg, width):
    out = []
    for i in range(len(x)):
        lane, warp_base = i % WARP, i - i % WARP
        segment = lane - lane % width
        if kind == "down":
            src = lane + arg if lane % width + arg < width else lane
        elif kind == "up":
            src = lane - arg if lane % width >= arg else lane
        elif kind == "xor":  # lanes of later segments are out of reach: own value
            src = lane ^ arg if (lane ^ arg) < segment + width else lane
        else:
            src = segment + arg % width
        out.append(x[warp_base + src])
    return out


@pytest.mark.parametrize("width", [32, 16, 4])
@pytest.mark.parametrize("kind,args", [("down", [0, 1, 5, 16, 31]), ("up", [1, 8]), ("xor", [1, 2, 16, 31]),
                                       ("idx", [0, 3, 17, 31, 40])])
def test_shuffle_matches_cuda_semantics(ops, kind, args, width):
    x = torch.arange(100, 164, dtype=torch.int32)
    for arg in args:
        got = ops.shuffle(x, kind, arg, width).tolist()
        assert got == shuffle_reference(x.tolist(), kind, arg, width), (kind, arg, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_shuffle_dtypes(ops, dtype):
    x = (torch.randn(128, dtype=torch.float64) * 1e6).to(dtype)
    x[0] = 2**40 + 1 if dtype == torch.int64 else 1.0 / 3.0  # all 8 bytes must travel
    for kind, arg in [("down", 3), ("xor", 7), ("idx", 0)]:
        assert ops.shuffle(x, kind, arg).tolist() == shuffle_reference(x.tolist(), kind, arg, WARP)


def test_shuffle_rejects_bad_width(ops):
    with pytest.raises(RuntimeError, match="power of two"):
        ops.shuffle(torch.zeros(32, dtype=torch.int32), "down", 1, 3)


@pytest.mark.parametrize("mode,timeout,match", [
    ("exit", 5.0, r"__syncthreads deadlock"),     # detected as soon as the other half exits
    ("stall", 0.5, r"__syncthreads deadlock: only 32 of 64 threads arrived within 0.5 s"),
    ("shuffle", 5.0, r"warp shuffle deadlock"),
    ("throw", 5.0, r"thread 5 threw"),             # the first exception wins over the barriers it broke
])
def test_divergent_kernels_fail_cleanly(ops, mode, timeout, match):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=match):
        ops.divergent_barrier(mode, timeout)
    assert time.monotonic() - start < 4.0
    # The pool and barriers are usable again after a failed launch.
    assert ops.racy_sum(torch.ones(64), True).item() == 64


def test_builtin_variables_and_block_order(ops):
    grid, block = [3, 2, 2], [32, 2, 2]
    rows = ops.indices(grid, block).view(3 * 2 * 2, 128, 13)
    for b in range(12):
        bx, by, bz = b % 3, b // 3 % 2, b // 6
        for t in range(128):
            tx, ty, tz = t % 32, t // 32 % 2, t // 64
            assert rows[b, t].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid, b]  # b: x fastest order


@pytest.mark.parametrize("threads,match", [
    (48, "block of 48 threads is not a multiple of the warp size 32"),
    (2048, "block \\(2048, 1, 1\\) exceeds"),
    (0, "block dimensions \\(0, 1, 1\\)"),
])
def test_bad_block_is_refused(ops, threads, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.bad_block(threads)


@pytest.mark.parametrize("grid,block,smem,match", [
    ([1, 70000, 1], [32, 1, 1], 0, "grid \\(1, 70000, 1\\) exceeds"),
    ([1, 1, 1], [32, 32, 2], 0, "block of 2048 threads exceeds the limit of 1024"),
    ([1, 1, 1], [32, 1, 1], 16, "dynamic shared memory is not supported"),
])
def test_bad_launch_is_refused(ops, grid, block, smem, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.indices(grid, block, smem)


def test_atomics(ops):
    blocks, threads = 3, 256
    n = blocks * threads
    got = ops.atomics(blocks, threads).tolist()
    assert got == [n, 3 * n, 5 * n, 0.5 * n, 0.25 * n, 2 * n, n, n * (n + 1) // 2]
