"""fusedbn against nn.BatchNorm1d/2d/3d: outputs, gradients and running statistics over several training
steps followed by eval, across shapes, layouts, dtypes and module options."""
import numpy
import pytest
import torch
from torch import nn

import fusedbn
from helpers import (BATCH_NORMS, LAYOUTS, Trio, assert_close, is_dense, make_input, memory_layout_matches, misaligned_copy,
                     over_dtype_pairs)


# (module dims, input shape): m = 2 values per channel, odd spatial sizes, C = 1, C = 1000, N = 1, and
# shapes large enough to split a channel over several row parts and several cache blocks (or, for short
# channels-first runs, the channels over several tiles). One value per channel is rejected in training
# (see test_bad_input), so every shape has at least two.
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


def _trio(dims, channels, dtype, param_dtype, device, **options):
    """torch's module, ours and torch's in float64, with identical non-trivial parameters."""
    torch_cls, fused_cls = BATCH_NORMS[dims]
    ref = torch_cls(channels, device=device, dtype=param_dtype, **options)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = fused_cls(channels, device=device, dtype=param_dtype, **options)
    ours.load_state_dict(ref.state_dict())
    return Trio(ref, ours)


def _compare_step(trio, x, dtype, label, generator):
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator).to(device=x.device, dtype=dtype)
    (y_ref, _), (y_ours, gx_ours), _ = trio.step(x, grad, label)
    # A dense input's element order is kept (as empty_like would); a non-dense one becomes what torch returns.
    layout_ref = x if is_dense(x) else y_ref
    assert memory_layout_matches(y_ours, layout_ref), f"{label}: output strides {y_ours.stride()}"
    assert memory_layout_matches(gx_ours, layout_ref), f"{label}: grad_input strides {gx_ours.stride()}"


@pytest.mark.parametrize("dims,shape", SHAPES, ids=[f"{d}d-{'x'.join(map(str, s))}" for d, s in SHAPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@over_dtype_pairs
@pytest.mark.parametrize(
    "options",
    [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
    ids=["default", "cumulative", "no-affine", "no-running-stats"],
)
def test_module_matches_torch(device, dims, shape, layout, dtype, param_dtype, options):
    trio = _trio(dims, shape[1], dtype, param_dtype, device, **options)
    gen, grad_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for step in range(3):
        x = make_input(shape, layout, dtype, device, mean=step - 1.0, std=1.0 + step, generator=gen)
        _compare_step(trio, x, dtype, f"train step {step}", grad_gen)
    trio.train(False)
    x = make_input(shape, layout, dtype, device, mean=0.5, std=2.0, generator=gen)
    _compare_step(trio, x, dtype, "eval", grad_gen)


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
    trio = _trio(2, shape[1], dtype, param_dtype, device)
    gen, grad_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    prepare = misaligned_copy if misaligned else (lambda t: t)
    x = prepare(make_input(shape, layout, dtype, device, mean=1.0, std=2.0, generator=gen))
    if misaligned:
        assert x.data_ptr() % 16 != 0
    _compare_step(trio, x, dtype, "train", grad_gen)
    trio.train(False)
    _compare_step(trio, prepare(make_input(shape, layout, dtype, device, generator=gen)), dtype, "eval", grad_gen)


@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_input_keeps_input_layout(device, input_layout, grad_layout, training):
    """grad_input follows the input's memory format, whatever the format of grad_output."""
    shape = (3, 4, 5, 6)
    trio = _trio(2, 4, torch.float64, torch.float64, device)
    trio.train(training)
    x = make_input(shape, input_layout, torch.float64, device)
    grad = make_input(shape, grad_layout, torch.float64, device)
    (_, gx_ref), (y_ours, gx_ours), _ = trio.run(x, grad)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_invstd_matches_the_ops(device, dtype):
    """The Python invstd (eval backward, SyncBatchNorm) is the ops' formula, to two units in the last place
    (torch's rsqrt is not correctly rounded; the ops' is): forward_eval of ones with mean 0 and no affine
    returns its invstd itself, over variances from 1e-8 to 1e8 and eps from 1e-5 to 0.1."""
    from fusedbn._derivatives import invstd_of

    gen = torch.Generator().manual_seed(0)
    var = (torch.rand(4096, generator=gen, dtype=torch.float64) * 10 ** torch.empty(4096, dtype=torch.float64).uniform_(
        -8, 8, generator=gen)).to(device=device, dtype=dtype)
    for eps in (1e-5, 1e-3, 0.1):
        ones = torch.ones(1, var.numel(), 1, device=device, dtype=dtype)
        ops_invstd = fusedbn.ops.forward_eval(ones, None, None, torch.zeros_like(var), var, eps).flatten()
        torch.testing.assert_close(invstd_of(var, eps), ops_invstd, rtol=2 * torch.finfo(dtype).eps, atol=0)
        # The ops' three correctly rounded steps (var + eps, sqrt, 1/) err by at most 2.5 units of roundoff
        # against the exact value (computed here in x87 extended precision, 64-bit mantissa).
        v = var.cpu().numpy().astype(numpy.longdouble) + numpy.longdouble(torch.tensor(eps, dtype=dtype).item())
        exact = 1 / numpy.sqrt(v)
        error = numpy.abs(ops_invstd.cpu().numpy().astype(numpy.longdouble) / exact - 1).max()
        assert error <= 1.25 * torch.finfo(dtype).eps, (eps, float(error))


# What asks for its gradient: (input, weight, bias) and the residual's ("residual-grad"), where anything does.
GRADIENT_CASES = [((x, w, b), residual) for x in (False, True) for w in (False, True) for b in (False, True)
                  for residual in ("no-residual", "residual", "residual-grad") if x or w or b or residual == "residual-grad"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("wanted,residual", GRADIENT_CASES,
                         ids=[("".join(n for n, on in zip("xwb", s) if on) or "none") + f"-{r}" for s, r in GRADIENT_CASES])
@pytest.mark.parametrize("activation", ["identity", "relu", "silu"])
def test_any_subset_of_gradients_matches_torch(device, training, wanted, residual, activation):
    """Every subset of (input, weight, bias, residual) asking for its gradient, through each of the backward's
    passes (training or eval statistics, dz from dy, the output or recomputed): the gradients asked for equal
    torch's composition act(F.batch_norm(x) + residual) in float64."""
    gen = torch.Generator().manual_seed(5)
    x, r = (torch.randn(4, 3, 5, 2, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
    rm, rv = torch.randn(3, dtype=torch.float64).to(device), (torch.rand(3, dtype=torch.float64) + 0.5).to(device)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
    torch_act = {"identity": lambda t: t, "relu": torch.relu, "silu": torch.nn.functional.silu}[activation]
    results = []
    for fused in (True, False):
        inputs = [t.clone().requires_grad_(want) for t, want in zip((x, w, b), wanted)]
        res = None if residual == "no-residual" else r.clone().requires_grad_(residual == "residual-grad")
        if fused:
            y = fusedbn.batch_norm_act(inputs[0], rm.clone(), rv.clone(), inputs[1], inputs[2], training, 0.1, 1e-5,
                                       residual=res, activation=activation)
        else:
            z = torch.nn.functional.batch_norm(inputs[0], rm.clone(), rv.clone(), inputs[1], inputs[2], training,
                                               0.1, 1e-5)
            y = torch_act(z if res is None else z + res)
        leaves = [t for t in (*inputs, res) if t is not None and t.requires_grad]
        results.append(torch.autograd.grad(y, leaves, grad))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, torch.float64)
