"""fusedbn against nn.BatchNorm1d/2d/3d: outputs, gradients and running statistics over several training
steps followed by eval, across shapes, layouts, dtypes and module options."""
import math

import pytest
import torch
from torch import nn

import fusedbn
from helpers import (LAYOUTS, assert_as_accurate, assert_close, is_dense, make_input, memory_layout_matches,
                     misaligned_copy, over_dtype_pairs)

MODULES = {1: (nn.BatchNorm1d, fusedbn.FusedBatchNorm1d), 2: (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d),
           3: (nn.BatchNorm3d, fusedbn.FusedBatchNorm3d)}

# (module dims, input shape): m = 2 values per channel, odd spatial sizes, C = 1, C = 1000, N = 1, and
# shapes large enough to split a channel over several row parts and several cache blocks (or, for short
# channels-first runs, the channels over several tiles).
# Every dtype with parameters of the same dtype, and half/bfloat16 input with float32 parameters (mixed precision).

# One value per channel is rejected in training (see test_errors), so every shape has at least two.
SHAPES = [
    (1, (2, 3)),
    (1, (7, 1000)),
    (1, (4, 3, 7)),
    (1, (1, 4, 5)),
    (2, (3, 1, 5, 7)),
    (2, (1, 3, 5, 5)),
    (2, (4, 6, 9, 11)),
    (2, (2, 1000, 2, 1)),
    (2, (20, 2, 64, 64)),
    (2, (70, 45, 7, 7)),  # short channels-first runs: tiles of 41 channels, a short last one, 3 row parts
    (3, (2, 3, 3, 4, 5)),
    (3, (1, 2, 2, 3, 3)),
]


def _modules(dims, channels, dtype, param_dtype, device, **options):
    """torch's module, ours, and torch's in float64 (the exact reference), with identical parameters."""
    torch_cls, fused_cls = MODULES[dims]
    ref = torch_cls(channels, device=device, dtype=param_dtype, **options)
    if ref.affine:  # non-trivial parameters, identical in all three
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = fused_cls(channels, device=device, dtype=param_dtype, **options)
    ours.load_state_dict(ref.state_dict())
    exact = torch_cls(channels, device=device, dtype=torch.float64, **options)
    exact.load_state_dict(ref.state_dict())
    return ref, ours, exact


def _step(module, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y, x.grad


def _compare_step(modules, x, dtype, label, generator):
    ref, ours, exact = modules
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator).to(device=x.device, dtype=dtype)
    y_ref, gx_ref = _step(ref, x, grad)
    y_ours, gx_ours = _step(ours, x, grad)
    y_exact, gx_exact = _step(exact, x.double(), grad.double())
    assert_as_accurate(y_ours, y_ref, y_exact, dtype, f"{label}: output")
    assert_as_accurate(gx_ours, gx_ref, gx_exact, dtype, f"{label}: grad_input")
    # A dense input's element order is kept (as empty_like would); a non-dense one becomes what torch returns.
    layout_ref = x if is_dense(x) else y_ref
    assert memory_layout_matches(y_ours, layout_ref), f"{label}: output strides {y_ours.stride()}"
    assert memory_layout_matches(gx_ours, layout_ref), f"{label}: grad_input strides {gx_ours.stride()}"
    if ref.affine:
        scale = math.sqrt(max(1, x.numel() // x.shape[1]))
        for name in ("weight", "bias"):
            theirs, mine, best = (getattr(m, name).grad for m in modules)
            assert_as_accurate(mine, theirs, best, mine.dtype, f"{label}: grad_{name}", scale)
        for m in modules:
            m.zero_grad()
    for name in ("running_mean", "running_var"):
        theirs, mine, best = (getattr(m, name) for m in modules)
        if theirs is not None:
            assert_as_accurate(mine, theirs, best, mine.dtype, f"{label}: {name}")
    if ref.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("dims,shape", SHAPES, ids=[f"{d}d-{'x'.join(map(str, s))}" for d, s in SHAPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@over_dtype_pairs
@pytest.mark.parametrize(
    "options",
    [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
    ids=["default", "cumulative", "no-affine", "no-running-stats"],
)
def test_module_matches_torch(device, dims, shape, layout, dtype, param_dtype, options):
    modules = _modules(dims, shape[1], dtype, param_dtype, device, **options)
    gen, grad_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for step in range(3):
        x = make_input(shape, layout, dtype, device, mean=step - 1.0, std=1.0 + step, generator=gen)
        _compare_step(modules, x, dtype, f"train step {step}", grad_gen)
    for m in modules:
        m.eval()
    x = make_input(shape, layout, dtype, device, mean=0.5, std=2.0, generator=gen)
    _compare_step(modules, x, dtype, "eval", grad_gen)


# Cases aimed at the CUDA kernels' code paths (they run on every device alike): channels-last vectors
# with the rows split over several blocks, several channel groups per row, runs that are not a multiple
# of the vector width or shorter than it, and data pointers that are not 16-byte aligned.
KERNEL_PATH_CASES = [
    ("channels_last", (4, 16, 16, 16), False),
    ("channels_last", (2, 264, 3, 3), False),
    ("contiguous", (16, 3, 7, 7), False),
    ("contiguous", (8, 5, 1, 3), False),
    ("contiguous", (5, 3, 5, 7), True),
    ("channels_last", (5, 16, 3, 3), True),
]


@pytest.mark.parametrize("layout,shape,misaligned", KERNEL_PATH_CASES,
                         ids=[f"{l}-{'x'.join(map(str, s))}{'-misaligned' if m else ''}" for l, s, m in KERNEL_PATH_CASES])
@over_dtype_pairs
def test_kernel_paths_match_torch(device, layout, shape, misaligned, dtype, param_dtype):
    modules = _modules(2, shape[1], dtype, param_dtype, device)
    gen, grad_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    prepare = misaligned_copy if misaligned else (lambda t: t)
    x = prepare(make_input(shape, layout, dtype, device, mean=1.0, std=2.0, generator=gen))
    if misaligned:
        assert x.data_ptr() % 16 != 0
    _compare_step(modules, x, dtype, "train", grad_gen)
    for m in modules:
        m.eval()
    _compare_step(modules, prepare(make_input(shape, layout, dtype, device, generator=gen)), dtype, "eval", grad_gen)


@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_input_keeps_input_layout(device, input_layout, grad_layout, training):
    """grad_input follows the input's memory format, whatever the format of grad_output."""
    shape = (3, 4, 5, 6)
    ref, ours, _ = _modules(2, 4, torch.float64, torch.float64, device)
    ref.train(training)
    ours.train(training)
    x = make_input(shape, input_layout, torch.float64, device)
    grad = make_input(shape, grad_layout, torch.float64, device)
    y_ref, gx_ref = _step(ref, x, grad)
    y_ours, gx_ours = _step(ours, x, grad)
    assert_close(gx_ours, gx_ref, torch.float64)
    assert memory_layout_matches(gx_ours, x)
    assert memory_layout_matches(y_ours, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(device, training, layout, affine):
    gen = torch.Generator().manual_seed(1)
    x = make_input((3, 2, 3, 2), layout, torch.float64, device, generator=gen).requires_grad_(True)
    weight = torch.rand(2, dtype=torch.float64, generator=gen).add(0.5).to(device).requires_grad_(affine)
    bias = torch.randn(2, dtype=torch.float64, generator=gen).to(device).requires_grad_(affine)
    running_mean = torch.randn(2, dtype=torch.float64, generator=gen).to(device)
    running_var = torch.rand(2, dtype=torch.float64, generator=gen).add(0.5).to(device)

    def fn(x, weight, bias):
        # Running stats are cloned per call so gradcheck's repeated evaluations see the same values.
        return fusedbn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ill_conditioned_input(device, layout):
    """Mean 1e4, std 1 in float32: our output and running_var are at least as close to float64 math as torch's."""
    shape = (16, 4, 12, 12)
    x = make_input(shape, layout, torch.float32, device, mean=1e4, std=1.0, generator=torch.Generator().manual_seed(2))
    exact = nn.BatchNorm2d(4, device=device, dtype=torch.float64)
    exact_y = exact(x.double())
    errors = {}
    for name, cls in (("torch", nn.BatchNorm2d), ("fusedbn", fusedbn.FusedBatchNorm2d)):
        module = cls(4, device=device)
        y = module(x)
        errors[name] = (
            (y.double() - exact_y).abs().max().item(),
            ((module.running_var.double() - exact.running_var).abs() / exact.running_var).max().item(),
        )
    ours, theirs = errors["fusedbn"], errors["torch"]
    # float32 rounding of the output itself (~6e-8 relative) bounds how close anyone can get.
    assert ours[0] <= max(theirs[0], 1e-6), errors
    assert ours[1] <= max(theirs[1], 1e-6), errors
