"""The CUDA kernels under the SIMT emulator's sanitizer (csrc/simt/simt.h), beyond what the equivalence
suites run on the simt device: the grid merges under many block orders, and launches shaped as on an H200
(the emulated device the host code sizes its grids for, csrc/simt/ops.cpp). Every op here runs sanitized:
shared-memory init/race checks, barrier and shuffle checks, the cross-block protocol of the partials, and the
arrival counters at rest (the op wrapper checks them, and the suite's hook again after each test).

The planted bugs that prove each check are in tests/test_simt_emulator.py."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_as_accurate

if importlib.util.find_spec("fusedbn._simt") is None:
    pytest.skip("fusedbn._simt not built (make test builds it)", allow_module_level=True)
import fusedbn._simt as simt

OPS = torch.ops.fusedbn_simt
SEEDS = range(6)


@pytest.fixture(autouse=True)
def counters_at_rest():
    yield
    assert simt.nonzero_arrival_counters() == []


@pytest.fixture
def h200():
    """The host code sizes its launches for an H200: 512-thread blocks, grids for 132 SMs."""
    simt.set_device("h200")
    try:
        yield simt.device()
    finally:
        simt.set_device("small")


def make_input(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def params(C, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype),
            torch.randn(C, generator=g).to(dtype), (torch.rand(C, generator=g) + 0.5).to(dtype))


def train_step(x, w, b, rm, rv, dy):
    """forward_train, then the backward of every gradient, through the emulator's ops."""
    y, mean, invstd = OPS.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    dx, dw, db, *_ = OPS.backward(dy, x, w, mean, invstd, True, [True, True, True], b)
    return y, mean, invstd, dx, dw, db


# ---- Every block order gives the same bits: the grid merges merge in a fixed order, whichever block
# arrives last (small emulated device: 2 SMs, 64-thread blocks, so these shapes split every channel).

MERGE_SHAPES = {
    "nchw": ((8, 3, 24, 24), False),  # 3 channels x 8 splits
    "nhwc": ((32, 16, 8, 8), True),   # channel groups x row splits
}


@pytest.mark.parametrize("name", MERGE_SHAPES)
def test_grid_merges_give_the_same_bits_in_every_block_order(name):
    shape, channels_last = MERGE_SHAPES[name]
    x = make_input(shape, torch.float32, channels_last)
    dy = make_input(shape, torch.float32, channels_last, seed=2)
    w, b, rm, rv = params(shape[1])
    results = []
    for seed in SEEDS:
        simt.set_seed(seed)
        rm_s, rv_s = rm.clone(), rv.clone()
        results.append((*train_step(x, w, b, rm_s, rv_s, dy), rm_s, rv_s, *OPS.batch_stats(x)))
    for seed, other in zip(SEEDS, results[1:]):
        for a, o in zip(results[0], other):
            assert torch.equal(a, o), f"block order seed {seed + 1} changed the result"


# ---- GPU-shaped launches: the host code's grid sizing for an H200, a bounded set of shapes that reach its
# real launch configurations. Each is checked against torch (as accurate, against float64).

H200_SHAPES = {
    # channels-first reduction: 512-thread blocks, 2 splits a channel; normalize: 64 blocks of 256
    "nchw-512x2": ((16, 4, 32, 32), torch.float32, False),
    # channels-first, hundreds of elementwise blocks (512 of 256) and 8 splits a channel
    "nchw-hundreds": ((16, 8, 64, 64), torch.float32, False),
    # channels-last: 16 x 32 blocks, 64 row splits; a wave of elementwise blocks (528 of 256 threads)
    "nhwc-64-splits": ((16, 64, 32, 32), torch.float32, True),
    # the one-launch forward at 448 threads (256 x 7 windows of 8 bf16 values a channel)
    "nchw-one-launch-bf16": ((256, 8, 7, 7), torch.bfloat16, False),
}


def torch_step(x, w, b, rm, rv, dy, dtype):
    """torch's training step in `dtype` (float32 parameters, or float64 for everything): y, dx, dw, db and
    the running statistics."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xt = x.detach().to(dtype).clone().requires_grad_(True)
    wt, bt = (t.detach().to(param_dtype).clone().requires_grad_(True) for t in (w, b))
    rm_t, rv_t = rm.to(param_dtype), rv.to(param_dtype)
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(dy.to(dtype))
    return yt.detach(), xt.grad, wt.grad, bt.grad, rm_t, rv_t


@pytest.mark.slow
@pytest.mark.parametrize("name", H200_SHAPES)
def test_h200_shaped_launches_match_torch(h200, name):
    shape, dtype, channels_last = H200_SHAPES[name]
    assert (h200["sm_count"], h200["max_threads"], h200["resident_threads_per_sm"]) == (132, 512, 1024)
    x = make_input(shape, dtype, channels_last)
    dy = make_input(shape, dtype, channels_last, seed=2)
    w, b, rm, rv = params(shape[1])
    rm_ours, rv_ours = rm.clone(), rv.clone()
    y, _, _, dx, dw, db = train_step(x, w, b, rm_ours, rv_ours, dy)
    ours = (y, dx, dw, db, rm_ours, rv_ours)
    theirs, exact = torch_step(x, w, b, rm, rv, dy, dtype), torch_step(x, w, b, rm, rv, dy, torch.float64)
    count = x.numel() // shape[1]
    for what, o, t, e, scale in zip(("y", "dx", "dw", "db", "running_mean", "running_var"), ours, theirs, exact,
                                    (1, 1, math.sqrt(count), math.sqrt(count), 1, 1)):
        assert_as_accurate(o, t.to(o.dtype), e, o.dtype, msg=f"{name} {what}", scale=scale)
    # eval: one elementwise pass from the running statistics
    y_eval = OPS.forward_eval(x, w, b, rm, rv, 1e-5)
    assert_as_accurate(y_eval, F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5),
                       F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training=False,
                                    eps=1e-5), dtype, msg=f"{name} eval")
