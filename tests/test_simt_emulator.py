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
def selftest():
    """The self-test module: its functions are the emulator's settings (csrc/simt/python_controls.h)."""
    from torch.utils.cpp_extension import load

    return load(
        name="_simt_selftest",
        sources=[str(ROOT / "csrc" / "simt" / "selftest.cpp")],
        extra_cflags=["-O1", "-std=c++20", "-fno-gnu-unique"],  # its own emulator state, not fusedbn._simt's
        is_python_module=True,
        verbose=False,
    )


@pytest.fixture(scope="module")
def ops(selftest):
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


# ---- The sanitizer's checks, each tripped by a planted bug (csrc/simt/selftest.cpp) with a message naming
# the kernel, the block and thread, and the shared element, barrier or address.

WHERE = r"in kernel \w+, block \(\d+, 0, 0\), thread \(\d+, 0, 0\)"


@pytest.mark.parametrize("bug,match", [
    ("unwritten_shared", r"shared-memory initcheck " + WHERE + r": reads element \d+ of the __shared__ array "
                         r"declared at selftest.cpp:\d+, which no thread of the block has written"),
    ("no_writer_fence", r"cross-block ordering " + WHERE + r": reads the partial at 0x[0-9a-f]+ written by block "
                        r"\(\d+, 0, 0\), thread \(0, 0, 0\), which did not __threadfence after writing it"),
    ("no_reader_fence", r"cross-block ordering " + WHERE + r": reads the partial at 0x[0-9a-f]+ written by block .* "
                        r"without acquiring it"),
    ("no_counter_reset", r"arrival counters not back at zero after block_sum returned .*counter 0 of the counters "
                         r"at 0x[0-9a-f]+: 3"),
    ("fixed_last_block", r"cross-block ordering " + WHERE + r": reads the partial at 0x[0-9a-f]+(, which no block has "
                         r"written in this launch| written by .* whose block did not arrive)"),
])
def test_grid_merge_bugs_are_reported(ops, bug, match):
    x = torch.randn(3 * 256)  # 3 blocks of 64 threads
    with pytest.raises(RuntimeError, match=match):
        ops.block_sum(x, 64, bug)
    # The launch that failed left nothing behind: the next one is clean.
    total, _ = ops.block_sum(x, 64)
    torch.testing.assert_close(total.double(), x.double().sum().reshape(1), rtol=1e-5, atol=1e-3)


def test_failure_names_the_seed_that_reproduces_the_block_order(ops):
    with pytest.raises(RuntimeError, match=r"\[blocks in random order: launch \d+ since FUSEDBN_SIMT_SEED=\d+, "
                                           r"concurrent blocks 3\]"):
        ops.block_sum(torch.randn(3 * 256), 64, "no_writer_fence")


def test_random_block_order_breaks_a_kernel_that_assumes_a_last_block(selftest, ops):
    """Without the sanitizer, only the block order shows the bug: with the blocks in a fixed order its
    "last" block would always run last and sum correctly; in random orders it sums too early."""
    x = torch.ones(8 * 256)
    selftest.set_sanitize(False)
    try:
        totals = []
        for seed in range(8):
            selftest.set_seed(seed)
            totals.append(ops.block_sum(x, 64, "fixed_last_block")[0].item())
            assert ops.block_sum(x, 64)[0].item() == x.numel()  # the correct kernel, in the same orders
    finally:
        selftest.set_sanitize(True)
    assert any(t != x.numel() for t in totals), totals


@pytest.mark.parametrize("bug,match", [
    ("no_barrier", r"shared-memory race " + WHERE + r": reads element \d+ of the __shared__ array declared at "
                   r"selftest.cpp:\d+, written by thread \(\d+, 0, 0\) with no barrier between \(read after write\)"),
    ("no_second_barrier", r"shared-memory race " + WHERE + r": writes element \d+ of .* read by thread "
                          r"\(\d+, 0, 0\) with no barrier between \(write after read\)"),
    ("same_element", r"shared-memory race " + WHERE + r": writes element 0 of .* written by thread \(\d+, 0, 0\) "
                     r"with no barrier between \(write after write\)"),
    ("warp_shuffle_only", r"shared-memory race " + WHERE + r": reads element \d+ .*\(read after write\)"),
])
def test_shared_memory_races_are_reported(ops, bug, match):
    with pytest.raises(RuntimeError, match=match):
        ops.shared_exchange(torch.arange(64.0), bug)


@pytest.mark.parametrize("bug", ["none", "warp_sync"])
def test_ordered_shared_memory_passes(ops, bug):
    x = torch.arange(64.0)
    got = ops.shared_exchange(x, bug)
    neighbour = (torch.arange(64) + 1) % 64 if bug == "none" else (torch.arange(64) // 32) * 32 + (torch.arange(64) + 1) % 32
    assert got.tolist() == (2 * x[neighbour] + 1).tolist()


def test_shared_memory_bounds_and_size_are_checked(ops):
    with pytest.raises(RuntimeError, match=r"shared-memory bounds " + WHERE + r": index 3\d of the __shared__ array "
                                           r"declared at selftest.cpp:\d+ holds 32 elements"):
        ops.shared_bounds(1, False)
    with pytest.raises(RuntimeError, match=r"shared-memory size " + WHERE + r": the block's static shared memory "
                                           r"reaches \d+ bytes with the __shared__ array declared at selftest.cpp:\d+, over the limit of 49152"):
        ops.shared_bounds(0, True)


def test_restrict_aliasing_is_reported(ops):
    x = torch.arange(1.0, 5.0)
    assert ops.restrict_alias(x, False).tolist() == (2 * x).repeat_interleave(32).tolist()
    with pytest.raises(RuntimeError, match=r"__restrict__ aliasing in kernel restrict_alias_kernel: block \(\d, 0, 0\), "
                                           r"thread \(\d+, 0, 0\) reads \[0x[0-9a-f]+, 0x[0-9a-f]+\) through the "
                                           r"__restrict__ pointer given 0x[0-9a-f]+, and block \(\d, 0, 0\), thread "
                                           r"\(0, 0, 0\) writes .* through the pointer given 0x[0-9a-f]+ in the same launch"):
        ops.restrict_alias(x, True)


def test_outputs_are_poisoned_so_an_unwritten_value_shows(ops):
    x = torch.arange(1.0, 101.0)
    assert ops.poisoned_output(x, False).tolist() == (2 * x).tolist()
    # The buggy call gets memory the correct call just freed, which held 2 * x[-1] there: it reads NaN instead.
    for _ in range(3):
        out = ops.poisoned_output(x, True)
        assert out[:-1].tolist() == (2 * x[:-1]).tolist() and math.isnan(out[-1].item())


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
    # detected as soon as the other half exits
    ("exit", 5.0, r"__syncthreads of block \(\d, 0, 0\) deadlock: 32 of 64 threads wait at selftest.cpp:\d+, which "
                  r"the other 32 can never reach"),
    ("stall", 0.5, r"__syncthreads of block \(\d, 0, 0\) deadlock: only 32 of 64 threads arrived at "
                   r"selftest.cpp:\d+ within 0.5 s"),
    ("shuffle", 5.0, r"warp \d of block \(\d, 0, 0\) deadlock"),
    ("throw", 5.0, r"thread 5 threw"),  # the first exception wins over the barriers it broke
    # every thread reaches a barrier, but not the same one: on a GPU, undefined behaviour that may pass
    ("two_barriers", 5.0, r"__syncthreads of block \(\d, 0, 0\) divergence: thread \(\d+, 0, 0\) waits at "
                          r"selftest.cpp:(\d+) while thread \(\d+, 0, 0\) waits at selftest.cpp:(?!\1)\d+"),
    ("two_shuffles", 5.0, r"warp \d of block \(\d, 0, 0\) divergence: thread \(\d+, 0, 0\) \(a shuffle\) waits at "
                          r"selftest.cpp:\d+ while .* waits at selftest.cpp:\d+"),
    ("partial_mask", 5.0, r"synccheck " + WHERE + r": warp shuffle with mask 65535: only the full warp mask"),
])
def test_divergent_kernels_fail_cleanly(ops, mode, timeout, match):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=match):
        ops.divergent_barrier(mode, timeout)
    assert time.monotonic() - start < 4.0
    # The pool and barriers are usable again after a failed launch.
    assert ops.shared_exchange(torch.arange(64.0)).sum().item() == 2 * torch.arange(64.0).sum().item() + 64


def test_builtin_variables(ops):
    grid, block = [3, 2, 2], [32, 2, 2]
    rows = ops.indices(grid, block).view(3 * 2 * 2, 128, 13)
    for b in range(12):
        bx, by, bz = b % 3, b // 3 % 2, b // 6
        for t in range(128):
            tx, ty, tz = t % 32, t // 32 % 2, t // 64
            assert rows[b, t, :12].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid]
            assert rows[b, t, 12] == rows[b, 0, 12]  # the block's start, as thread 0 recorded it


def block_starts(selftest, ops, seed, blocks=24):
    """The order in which a launch's blocks started, after set_seed(seed), one block at a time."""
    selftest.set_seed(seed)
    rows = ops.indices([blocks, 1, 1], [32, 1, 1]).view(blocks, 32, 13)
    return rows[:, 0, 12].argsort().tolist()


def test_blocks_start_in_a_seeded_random_order(selftest, ops):
    saved = selftest.concurrent_blocks()
    selftest.set_concurrent_blocks(1)
    try:
        orders = [block_starts(selftest, ops, seed) for seed in (1, 2, 3)]
        assert block_starts(selftest, ops, 1) == orders[0]  # the seed reproduces it
    finally:
        selftest.set_concurrent_blocks(saved)
    assert all(sorted(o) == list(range(24)) for o in orders)
    assert len({tuple(o) for o in orders + [list(range(24))]}) == 4  # not the grid's order, nor each other's


def test_blocks_run_concurrently(selftest, ops):
    """settings().concurrent_blocks blocks at once, each on its own threads (4 unless the environment says)."""
    assert selftest.concurrent_blocks() > 1
    assert ops.blocks_in_flight(12).max().item() > 1


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


def test_kernels_declare_shared_memory_as_shared_arrays():
    """A plain `__shared__ T name[N]` would be one static copy for every block the emulator runs at once
    (simt.h): the kernels declare shared memory as SharedArray, which has a copy per block and is checked."""
    import re

    sources = [*(ROOT / "csrc" / "cuda").glob("*.cuh"), ROOT / "csrc" / "simt" / "selftest.cpp"]
    declarations = [(p.name, line) for p in sources for line in p.read_text().splitlines()
                    if re.search(r"^\s*__shared__\b", line)]
    assert declarations, "no shared memory found: the pattern is stale"
    plain = [d for d in declarations if not re.search(r"__shared__\s+SharedArray<", d[1])]
    assert plain == []
