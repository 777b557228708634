"""PReLU as the ops' fused activation (issue 29), at the ops level: torch.ops.fusedbn.* (fusedbn.ops, routed to
the emulator's fusedbn_simt on the simt device) called with activation="prelu" and its activation_weight (1 or C
slopes), on every device of the `backend` fixture, against torch's composition
F.prelu(F.batch_norm(x, ...) [+ residual], slopes): torch in the tested dtype and in float64 (the oracle: ours
as accurate as torch, helpers.assert_as_accurate), every gradient from torch's autograd.

forward_train (output, mean and invstd, running statistics updated in place), forward_eval, backward in
training and eval under every combination of output_mask / grad_residual / grad_activation_weight (None where
not asked), grad_sums' per-channel PReLU sum and backward_elemt, the meta kernels (meta device and FakeTensor:
every output's shape, dtype and strides as the real kernels'), opcheck's schema and FakeTensor checks (no two
outputs sharing memory), NaN and inf where torch's composition puts them, and the activation_weight checks (a
rejected forward_train leaves the running statistics as they were).
Shapes reach the kernels' edges: (N, C) and (N, C, L), 2-D and 3-D, both layouts, odd spatial sizes, 1x1,
C not a multiple of 8, a channels-first run past the CPU's 64-value tiles that splits a channel over blocks
under the emulator."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedbn
from helpers import assert_as_accurate, make_input, memory_layout_matches, over_dtype_pairs

EPS, MOMENTUM = 1e-5, 0.1
GRADS = ("input", "weight", "bias", "residual", "activation_weight")  # backward's five outputs, in order

SHAPES = {
    "NC-6x13": (6, 13),               # (N, C), C not a multiple of 8: the channels-last vectors' tail
    "NCL-3x11x5": (3, 11, 5),         # (N, C, L)
    "2d-2x3x7x7": (2, 3, 7, 7),       # odd spatial size: runs that are not whole vectors
    "2d-4x10x1x1": (4, 10, 1, 1),     # 1x1: runs of one value (channels grouped per CPU tile)
    "2d-2x13x3x5": (2, 13, 3, 5),     # C = 13, odd spatial
    "3d-2x5x3x4x3": (2, 5, 3, 4, 3),  # 3-D
    "long-run-2x3x700": (2, 3, 700),  # channels-first runs of 700: past the CPU's 64-value tiles; each channel
                                      # split over blocks of the emulator's small device (more than one block holds)
}
# (shape, layout) pairs: both layouts where they differ ((N, C) is both at once).
LAYOUT_CASES = [(name, layout) for name, shape in SHAPES.items()
                for layout in (["contiguous", "channels_last"] if len(shape) > 2 else ["contiguous"])]
LAYOUT_IDS = [f"{name}-{layout}" for name, layout in LAYOUT_CASES]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class Case:
    """One call's tensors: input, residual (or None), upstream gradient, BatchNorm's weight, bias, running
    statistics, and PReLU's slopes."""

    x: torch.Tensor
    r: torch.Tensor | None
    dy: torch.Tensor
    w: torch.Tensor | None
    b: torch.Tensor | None
    rm: torch.Tensor | None
    rv: torch.Tensor | None
    a: torch.Tensor
    layout: str = "contiguous"

    def map(self, fn):
        return dataclasses.replace(self, **{k: fn(v) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})

    @property
    def channels(self):
        return self.x.shape[1]


def make_case(shape, layout, dtype, param_dtype, device, residual, slopes, seed=0, slope_dtype=None):
    """Values that put z = bn(x) [+ r] on both sides of 0 in every channel; slopes in [-0.5, 1.5) (negative
    ones, and ones above 1), of the parameters' dtype unless `slope_dtype`; the residual in the other layout
    than the input (the kernels bring it to the input's), the upstream gradient channels-first."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    other = "contiguous" if layout == "channels_last" else "channels_last"
    x = make_input(shape, layout, dtype, device, mean=0.5, std=1.5, generator=gen)
    r = make_input(shape, other, dtype, device, generator=gen) if residual else None
    dy = make_input(shape, "contiguous", dtype, device, generator=gen)

    def param(t):
        return t.to(device=device, dtype=param_dtype)

    w, b = param(torch.rand(C, generator=gen) + 0.5), param(torch.rand(C, generator=gen) - 0.5)
    rm, rv = param(torch.randn(C, generator=gen) * 0.5), param(torch.rand(C, generator=gen) + 0.5)
    a = (torch.rand(C if slopes == "C" else 1, generator=gen) * 2 - 0.5).to(device, slope_dtype or param_dtype)
    return Case(x=x, r=r, dy=dy, w=w, b=b, rm=rm, rv=rv, a=a, layout=layout)


def _prelu(z, a):
    """torch's PReLU in z's dtype; float32 slopes of half-precision z applied in float32 (F.prelu refuses
    mixed dtypes), as the ops apply them."""
    return F.prelu(z, a) if a.dtype == z.dtype else F.prelu(z.to(a.dtype), a).to(z.dtype)


@dataclasses.dataclass
class Composition:
    output: torch.Tensor
    pre_activation: torch.Tensor  # z = bn(x) [+ r]
    terms: torch.Tensor           # |bn(x)| + |r|: the magnitude z's rounding is relative to
    grads: dict
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    mean: torch.Tensor            # the statistics normalize used (batch or running), in the statistics' dtype
    invstd: torch.Tensor


def composition(case, training, exact=False):
    """torch's F.prelu(F.batch_norm(x, ...) [+ r], a) on the case (all of it in float64 when `exact`), with
    autograd's gradient of every tensor for case.dy, and the running statistics after it."""
    c = case.map(torch.Tensor.double) if exact else case
    leaves = {name: None if t is None else t.detach().clone().requires_grad_(True)
              for name, t in zip(GRADS, (c.x, c.w, c.b, c.r, c.a))}
    rm, rv = (None if t is None else t.clone() for t in (c.rm, c.rv))
    bn = F.batch_norm(leaves["input"], rm, rv, leaves["weight"], leaves["bias"], training, MOMENTUM, EPS)
    z = bn if c.r is None else bn + leaves["residual"]
    y = _prelu(z, leaves["activation_weight"])
    y.backward(c.dy)
    acc = acc_dtype(c.x.dtype)
    if training:
        # torch's own statistics in the input's dtype (with parameters of the statistics' dtype, so that
        # half-precision input gets them unrounded, as ours are).
        ones = torch.ones(case.channels, dtype=acc, device=c.x.device)
        _, mean, invstd = torch.ops.aten.native_batch_norm(c.x, ones, torch.zeros_like(ones), None, None, True, 0.0,
                                                           EPS)
    else:
        mean, invstd = c.rm.to(acc), torch.rsqrt(c.rv.to(acc) + EPS)
    terms = bn.detach().abs() + (0 if c.r is None else c.r.abs())
    return Composition(y.detach(), z.detach(), terms, {k: None if v is None else v.grad for k, v in leaves.items()},
                       rm, rv, mean, invstd)


def _channel_view(t, x):
    return t.reshape([-1 if d == 1 else 1 for d in range(x.dim())])


def kink_allowances(case, exact, dtype, training):
    """PReLU's derivative jumps at z = 0 (from a[c] to 1): where the exact z is within the dtype's rounding of
    0, either side is right, for torch and for us alike (``either_side``: those elements' input and residual
    gradients are set to the exact ones before comparing). ``slack``: what such elements may add to a channel's
    sums (the jump |1 - a[c]| |dy| times 1 or |x_hat|; the slope's gradient z * dy is continuous there, so at
    most the rounding band times |dy|) and, in training, to every dx of the channel through its mean terms."""
    x = case.x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    band = 8 * torch.finfo(dtype).eps * (exact.terms + 1)
    either_side = exact.pre_activation.abs() <= band
    dy = case.dy.double().abs()
    a = case.a.double()
    a = _channel_view(a, x) if a.numel() > 1 else a
    jump = torch.where(either_side, (1 - a).abs() * dy, 0)
    centered = (x - _channel_view(exact.mean, x)).abs()
    x_hat = centered * _channel_view(exact.invstd, x)
    s1, s2 = jump.sum(dims), (jump * x_hat).sum(dims)
    slope = torch.where(either_side, band * dy, 0)
    slack = {"grad_bias": s1.max().item(), "grad_weight": s2.max().item(), "sum_dz": s1.max().item(),
             "sum_dz_xmu": (jump * centered).sum(dims).max().item(),
             "grad_activation_weight": (slope.sum(dims).max() if case.a.numel() > 1 else slope.sum()).item(),
             "sum_slope": slope.sum(dims).max().item()}
    if training:
        count = max(1, x.numel() // x.shape[1])
        alpha = exact.invstd * (1 if case.w is None else case.w.double().abs())
        slack["grad_input"] = (alpha * (s1 + x_hat.amax(dims) * s2) / count).max().item()
    return either_side, slack


def _label(case, training):
    return (f"{'x'.join(map(str, case.x.shape))} {case.layout} {str(case.x.dtype)[6:]} (params "
            f"{str(case.a.dtype)[6:]}), {case.a.numel()} slope(s), {'with' if case.r is not None else 'no'} residual, "
            f"{'train' if training else 'eval'}")


def check_grads(ours, asked, case, theirs, exact, training, label):
    """backward's five outputs: each asked one as accurate as torch's against float64 (sums with their
    count's allowance), each other one None; grad_input in the input's layout."""
    dtype = case.x.dtype
    either_side, slack = kink_allowances(case, exact, dtype, training)
    count = case.x.numel() // case.channels
    assert len(ours) == 5, f"{label}: backward returned {len(ours)} outputs"
    for name, o, want in zip(GRADS, ours, asked):
        what = f"{label}: grad_{name}"
        if not want:
            assert o is None, f"{what} not asked for, but returned"
            continue
        assert o is not None, f"{what} asked for, but None"
        t, e = theirs.grads[name], exact.grads[name]
        assert o.shape == t.shape and o.dtype == t.dtype, f"{what}: {o.shape} {o.dtype}, expected {t.shape} {t.dtype}"
        if name == "input":
            assert memory_layout_matches(o, case.x), f"{what}: strides {o.stride()}, input's {case.x.stride()}"
        if name in ("input", "residual"):
            t, o = (torch.where(either_side, e.to(v.dtype), v) for v in (t, o))
            scale = 1.0
        else:
            scale = math.sqrt(case.x.numel() if name == "activation_weight" and case.a.numel() == 1 else count)
        assert_as_accurate(o, t, e, t.dtype, what, scale=scale, slack=slack.get(f"grad_{name}", 0.0))


def prelu_backward(case, mean, invstd, training, output_mask=(True, True, True), grad_residual=None,
                   grad_activation_weight=True):
    return fusedbn.ops.backward(case.dy, case.x, case.w, mean, invstd, training, list(output_mask), bias=case.b,
                                residual=case.r, activation="prelu", activation_param=0.0,
                                grad_residual=case.r is not None if grad_residual is None else grad_residual,
                                activation_weight=case.a, grad_activation_weight=grad_activation_weight)


def check_training_and_eval(device, shape, layout, dtype, param_dtype, residual, slopes, slope_dtype=None):
    """forward_train (output, statistics, running statistics), its backward with everything asked, then
    forward_eval and its backward on the case's running statistics, against torch's composition."""
    case = make_case(shape, layout, dtype, param_dtype, device, residual, slopes, slope_dtype=slope_dtype)
    acc = acc_dtype(dtype)
    for training in (True, False):
        label = _label(case, training)
        theirs, exact = composition(case, training), composition(case, training, exact=True)
        if training:
            rm, rv = case.rm.clone(), case.rv.clone()
            y, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, rm, rv, MOMENTUM, EPS,
                                                        residual=case.r, activation="prelu", activation_param=0.0,
                                                        activation_weight=case.a)
            for name, o, t, e in (("mean", mean, theirs.mean, exact.mean),
                                  ("invstd", invstd, theirs.invstd, exact.invstd)):
                assert o.dtype == acc and o.shape == (case.channels,), f"{label}: {name} {o.dtype} {o.shape}"
                assert_as_accurate(o, t, e, acc, f"{label}: {name}")
            for name, o, t, e in (("running_mean", rm, theirs.running_mean, exact.running_mean),
                                  ("running_var", rv, theirs.running_var, exact.running_var)):
                assert_as_accurate(o, t, e, param_dtype, f"{label}: {name}")
        else:
            y = fusedbn.ops.forward_eval(case.x, case.w, case.b, case.rm, case.rv, EPS, residual=case.r,
                                         activation="prelu", activation_param=0.0, activation_weight=case.a)
            mean, invstd = case.rm.to(acc), torch.rsqrt(case.rv.to(acc) + EPS)
        assert y.dtype == dtype and memory_layout_matches(y, case.x), f"{label}: output {y.dtype} {y.stride()}"
        assert_as_accurate(y, theirs.output, exact.output, dtype, f"{label}: output")
        grads = prelu_backward(case, mean, invstd, training)
        check_grads(grads, (True, True, True, residual, True), case, theirs, exact, training, label)


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn-prelu", "bn-add-prelu"])
@pytest.mark.parametrize("shape_name,layout", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_training_and_eval_match_the_composition(backend, shape_name, layout, residual, slopes):
    check_training_and_eval(backend.device, SHAPES[shape_name], layout, torch.float32, torch.float32, residual, slopes)


DTYPE_CASES = {"2d-2x3x7x7-contiguous": ((2, 3, 7, 7), "contiguous"),
               "2d-2x13x3x5-channels_last": ((2, 13, 3, 5), "channels_last"),
               "NCL-3x11x20-contiguous": ((3, 11, 20), "contiguous")}


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("case_name", DTYPE_CASES)
@over_dtype_pairs
def test_dtypes_match_the_composition(backend, case_name, dtype, param_dtype, slopes):
    """Every (input, parameter) dtype pair, the slopes in the parameters' dtype (float32 for half-precision
    input with float32 parameters), with a residual; half precision as accurate as torch's composition in it."""
    shape, layout = DTYPE_CASES[case_name]
    check_training_and_eval(backend.device, shape, layout, dtype, param_dtype, True, slopes)


# (input, BatchNorm parameters, slopes): the slopes' dtype is the input's or float32 (half precision), whatever
# the parameters' is.
SLOPE_DTYPES = [(torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, torch.float32, torch.float16)]


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("dtype,param_dtype,slope_dtype", SLOPE_DTYPES,
                         ids=[f"{str(a)[6:]}-params-{str(b)[6:]}-slopes-{str(c)[6:]}" for a, b, c in SLOPE_DTYPES])
def test_slopes_of_their_own_dtype(backend, dtype, param_dtype, slope_dtype, slopes):
    check_training_and_eval(backend.device, (2, 13, 3, 5), "channels_last", dtype, param_dtype, True, slopes,
                            slope_dtype)


# (output_mask, grad_residual, grad_activation_weight): what a backward can be asked for.
ASKED = [
    ([True, True, True], True, True),
    ([True, True, True], False, False),    # the slopes' gradient not asked: None
    ([False, False, False], False, True),  # the slopes' gradient alone: no BatchNorm sum, no dx asked
    ([True, False, False], False, True),
    ([False, True, False], False, True),
    ([False, False, True], True, True),
    ([False, False, False], True, False),  # the residual's alone
    ([False, True, True], False, False),
    ([True, False, False], True, False),
    ([True, False, False], False, False),  # dx alone (in eval: no sums at all)
]
ASKED_IDS = [f"mask{''.join(str(int(m)) for m in mask)}-residual{int(gr)}-slopes{int(ga)}" for mask, gr, ga in ASKED]


@pytest.mark.parametrize("asked", ASKED, ids=ASKED_IDS)
@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((2, 3, 7, 7), "contiguous"), ((2, 13, 3, 5), "channels_last")],
                         ids=["2x3x7x7-contiguous", "2x13x3x5-channels_last"])
def test_backward_computes_what_is_asked(backend, shape, layout, training, slopes, asked):
    """Each output the call asks for is right whatever else is asked (the backward plans its passes from
    what is asked: the slopes' gradient needs the sums pass even where no BatchNorm gradient does), the
    others None."""
    output_mask, grad_residual, grad_activation_weight = asked
    case = make_case(shape, layout, torch.float32, torch.float32, backend.device, True, slopes, seed=1)
    acc = acc_dtype(case.x.dtype)
    if training:
        _, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, None, None, MOMENTUM, EPS, residual=case.r,
                                                    activation="prelu", activation_weight=case.a)
    else:
        mean, invstd = case.rm.to(acc), torch.rsqrt(case.rv.to(acc) + EPS)
    grads = prelu_backward(case, mean, invstd, training, output_mask, grad_residual, grad_activation_weight)
    check_grads(grads, (*output_mask, grad_residual, grad_activation_weight), case, composition(case, training),
                composition(case, training, exact=True), training, _label(case, training) + f", asked {asked}")


SUMS_CASES = [("2d-2x3x7x7", "contiguous"), ("2d-2x13x3x5", "channels_last"), ("NC-6x13", "contiguous"),
              ("long-run-2x3x700", "contiguous")]


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn-prelu", "bn-add-prelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16-params-float32"])
@pytest.mark.parametrize("shape_name,layout", SUMS_CASES, ids=[f"{n}-{l}" for n, l in SUMS_CASES])
def test_grad_sums_and_backward_elemt(backend, shape_name, layout, dtype, residual, slopes):
    """SyncBatchNorm's pieces: grad_sums' (sum dz, sum dz (x - mean), sum dy min(z, 0)) per channel (the
    last: PReLU's per-channel slope gradient, whatever the slopes' count), and backward_elemt given the
    centering terms from them: the training backward's dx (and dz for the residual)."""
    case = make_case(SHAPES[shape_name], layout, dtype, torch.float32, backend.device, residual, slopes, seed=2)
    acc = acc_dtype(dtype)
    C, count = case.channels, case.x.numel() // case.channels
    _, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, None, None, MOMENTUM, EPS, residual=case.r,
                                                activation="prelu", activation_weight=case.a)
    sums = fusedbn.ops.grad_sums(case.dy, case.x, case.w, mean, invstd, bias=case.b, residual=case.r,
                                 activation="prelu", activation_param=0.0, activation_weight=case.a)
    label = _label(case, True)
    assert len(sums) == 3, f"{label}: grad_sums returned {len(sums)} outputs"
    # The oracle with one slope per channel (equal ones for a single slope): the same output, and the slopes'
    # gradient per channel.
    per_channel = dataclasses.replace(case, a=case.a.expand(C).clone())
    theirs, exact = composition(per_channel, True), composition(per_channel, True, exact=True)
    _, slack = kink_allowances(case, exact, dtype, True)
    expected = {"sum_dz": (theirs.grads["bias"], exact.grads["bias"]),
                "sum_dz_xmu": (theirs.grads["weight"] / theirs.invstd.to(theirs.grads["weight"].dtype),
                               exact.grads["weight"] / exact.invstd),
                "sum_slope": (theirs.grads["activation_weight"], exact.grads["activation_weight"])}
    for (name, (t, e)), o in zip(expected.items(), sums):
        assert o is not None and o.dtype == acc and o.shape == (C,), \
            f"{label}: {name} {o if o is None else (o.dtype, o.shape)}"
        assert_as_accurate(o, t.to(acc), e, acc, f"{label}: grad_sums {name}", scale=math.sqrt(count),
                           slack=slack[name])
    sum_dz, sum_dz_xmu, _ = sums
    dx, dr = fusedbn.ops.backward_elemt(case.dy, case.x, case.w, mean, invstd, sum_dz / count,
                                        invstd * invstd * sum_dz_xmu / count, bias=case.b, residual=case.r,
                                        activation="prelu", activation_param=0.0, grad_residual=residual,
                                        activation_weight=case.a)
    grads = (dx, None, None, dr, None)
    check_grads(grads, (True, False, False, residual, False), case, theirs, exact, True, f"{label}: backward_elemt")


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
def test_grad_sums_third_output_is_none_without_prelu(backend, activation):
    case = make_case((2, 3, 4, 5), "contiguous", torch.float32, torch.float32, backend.device, True, "C")
    _, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, None, None, MOMENTUM, EPS)
    sums = fusedbn.ops.grad_sums(case.dy, case.x, case.w, mean, invstd, bias=case.b, residual=case.r,
                                 activation=activation, activation_param=0.1 if activation == "leaky_relu" else 0.0)
    assert len(sums) == 3 and sums[2] is None and sums[0].shape == sums[1].shape == (3,)


def test_without_affine_or_running_statistics(backend):
    """No weight, no bias, no running statistics (alpha = invstd, beta = 0): training forward and backward."""
    case = dataclasses.replace(make_case((3, 6, 5, 3), "channels_last", torch.float32, torch.float32, backend.device,
                                         True, "C", seed=3), w=None, b=None, rm=None, rv=None)
    label = _label(case, True) + ", no weight, bias or running statistics"
    theirs, exact = composition(case, True), composition(case, True, exact=True)
    y, mean, invstd = fusedbn.ops.forward_train(case.x, None, None, None, None, MOMENTUM, EPS, residual=case.r,
                                                activation="prelu", activation_weight=case.a)
    assert_as_accurate(y, theirs.output, exact.output, torch.float32, f"{label}: output")
    grads = prelu_backward(case, mean, invstd, True, (True, False, False))
    check_grads(grads, (True, False, False, True, True), case, theirs, exact, True, label)


# ---- The meta kernels (meta device, FakeTensor tracing): every output's shape, dtype and strides as the
# real kernels' (each op's outputs, with what the spec says of the new ones checked on both).

META_CASES = {
    "2x3x7x7-channels_last-float32": ((2, 3, 7, 7), "channels_last", torch.float32, torch.float32),
    "3x11x5-bfloat16-params-float32": ((3, 11, 5), "contiguous", torch.bfloat16, torch.float32),
    "6x13-float16": ((6, 13), "contiguous", torch.float16, torch.float16),
    "2x5x3x4x3-channels_last-float64": ((2, 5, 3, 4, 3), "channels_last", torch.float64, torch.float64),
    "2x4x1x1-channels_last-float32": ((2, 4, 1, 1), "channels_last", torch.float32, torch.float32),
}


def _every_op(case):
    """Each op's outputs on the case (prelu), by the call's name; the backward's under ASKED[:3] (everything,
    all but the slopes' gradient, the slopes' gradient alone) in training and eval."""
    out = {}
    rm, rv = case.rm.clone(), case.rv.clone()
    y, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, rm, rv, MOMENTUM, EPS, residual=case.r,
                                                activation="prelu", activation_weight=case.a)
    out["forward_train"] = (y, mean, invstd)
    out["forward_eval"] = (fusedbn.ops.forward_eval(case.x, case.w, case.b, case.rm, case.rv, EPS, residual=case.r,
                                                    activation="prelu", activation_weight=case.a),)
    for training in (True, False):
        for i, asked in enumerate(ASKED[:3]):
            out[f"backward-{'train' if training else 'eval'}-{ASKED_IDS[i]}"] = prelu_backward(case, mean, invstd,
                                                                                             training, *asked)
    out["grad_sums"] = fusedbn.ops.grad_sums(case.dy, case.x, case.w, mean, invstd, bias=case.b, residual=case.r,
                                             activation="prelu", activation_weight=case.a)
    out["backward_elemt"] = fusedbn.ops.backward_elemt(case.dy, case.x, case.w, mean, invstd, mean, invstd,
                                                       bias=case.b, residual=case.r, activation="prelu",
                                                       grad_residual=True, activation_weight=case.a)
    return out


def _check_new_outputs(outputs, case, label):
    """What the spec says of the new outputs: the slopes' gradient in the slopes' shape and dtype, None
    unless asked; grad_sums' third per channel in the statistics' dtype."""
    for training in ("train", "eval"):
        for i, (_, _, grad_slopes_asked) in enumerate(ASKED[:3]):
            name = f"backward-{training}-{ASKED_IDS[i]}"
            result = outputs[name]
            assert len(result) == 5, f"{label}: {name} returned {len(result)} outputs"
            grad_slopes = result[4]
            if not grad_slopes_asked:
                assert grad_slopes is None, f"{label}: {name}: the slopes' gradient not asked, but returned"
            else:
                got = None if grad_slopes is None else (grad_slopes.shape, grad_slopes.dtype)
                assert got == (case.a.shape, case.a.dtype), f"{label}: {name}: the slopes' gradient {got}"
    sums = outputs["grad_sums"]
    assert len(sums) == 3 and sums[2] is not None, f"{label}: grad_sums {sums}"
    assert (sums[2].shape, sums[2].dtype) == ((case.channels,), acc_dtype(case.x.dtype)), f"{label}: grad_sums' third"


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("case_name", META_CASES)
@pytest.mark.parametrize("dry_run", ["meta", "fake"])
def test_meta_kernels_describe_the_real_outputs(dry_run, case_name, slopes):
    shape, layout, dtype, param_dtype = META_CASES[case_name]
    case = make_case(shape, layout, dtype, param_dtype, "cpu", True, slopes)
    real = _every_op(case)
    _check_new_outputs(real, case, f"{case_name} real")
    if dry_run == "meta":
        dry = _every_op(case.map(lambda t: t.to("meta")))
    else:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            dry = _every_op(case.map(mode.from_tensor))
    _check_new_outputs(dry, case, f"{case_name} {dry_run}")
    for name, outputs in real.items():
        assert len(dry[name]) == len(outputs), name
        for i, (r, d) in enumerate(zip(outputs, dry[name])):
            real_, dry_ = ((None if t is None else (t.shape, t.dtype, t.stride())) for t in (r, d))
            assert dry_ == real_, f"{name} output {i}: {dry_run} {dry_}, real {real_}"


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
def test_opcheck_schema_and_fake_kernels(backend, slopes):
    """torch.library.opcheck's schema check (no argument written but the running statistics: the slopes
    untouched) and FakeTensor check on every op called with prelu. (The ops' autograd, the Python side's, is
    test_prelu.py's.)"""
    case = make_case((2, 5, 3, 3), "channels_last", torch.bfloat16, torch.float32, backend.device, True, slopes)
    ops = getattr(torch.ops, backend.ops_library)
    _, mean, invstd = ops.forward_train(case.x, case.w, case.b, None, None, MOMENTUM, EPS, case.r, "prelu", 0.0, case.a)
    c = case
    calls = [
        (ops.forward_train, (c.x, c.w, c.b, c.rm, c.rv, MOMENTUM, EPS, c.r, "prelu", 0.0, c.a)),
        (ops.forward_train, (c.x, None, None, None, None, MOMENTUM, EPS, None, "prelu", 0.0, c.a)),
        (ops.forward_eval, (c.x, c.w, c.b, c.rm, c.rv, EPS, c.r, "prelu", 0.0, c.a)),
        (ops.backward, (c.dy, c.x, c.w, mean, invstd, True, [True, True, True], c.b, None, c.r, "prelu", 0.0, True,
                        c.a, True)),
        (ops.backward, (c.dy, c.x, c.w, mean, invstd, True, [False, False, False], c.b, None, c.r, "prelu", 0.0,
                        False, c.a, True)),
        (ops.backward, (c.dy, c.x, c.w, mean, invstd, False, [True, False, True], c.b, None, None, "prelu", 0.0,
                        False, c.a, False)),
        (ops.grad_sums, (c.dy, c.x, c.w, mean, invstd, c.b, None, c.r, "prelu", 0.0, c.a)),
        (ops.backward_elemt, (c.dy, c.x, c.w, mean, invstd, mean, invstd, c.b, None, c.r, "prelu", 0.0, True, c.a)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float64, torch.float64)], ids=["float32", "bf16-params-float32",
                                                                                     "float64"])
def test_outputs_share_no_memory(backend, dtype, param_dtype, slopes):
    """The schemas declare fresh outputs (no alias annotation): no two outputs of one backward or grad_sums call
    share a storage (what opcheck's schema check finds, by name here)."""
    case = make_case((2, 5, 3, 3), "contiguous", dtype, param_dtype, backend.device, True, slopes)
    _, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, None, None, MOMENTUM, EPS, residual=case.r,
                                                activation="prelu", activation_weight=case.a)
    sums = fusedbn.ops.grad_sums(case.dy, case.x, case.w, mean, invstd, bias=case.b, residual=case.r,
                                 activation="prelu", activation_weight=case.a)
    calls = {f"backward ({'train' if training else 'eval'})": (GRADS, prelu_backward(case, mean, invstd, training))
             for training in (True, False)}
    calls["grad_sums"] = (("sum_dz", "sum_dz_xmu", "sum_slope"), sums)
    for call, (names, outputs) in calls.items():
        seen = {}  # storage -> (name, offset)
        for name, t in zip(names, outputs):
            if t is not None:
                storage = t.untyped_storage().data_ptr()
                assert storage not in seen, f"{call}: {name} (storage offset {t.storage_offset()}) shares its " \
                                            f"storage with {seen[storage][0]} (offset {seen[storage][1]})"
                seen[storage] = (name, t.storage_offset())


# ---- NaN and inf: where torch's composition has them, we have them (and the finite values as accurate).

def _assert_nonfinite_like(ours, theirs, exact, dtype, what, scale=1.0):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, f"{what}: {ours.shape} {ours.dtype}"
    assert torch.equal(ours.isnan(), theirs.isnan()), f"{what}: NaNs at {ours.isnan().nonzero().tolist()}, " \
                                                      f"torch's at {theirs.isnan().nonzero().tolist()}"
    for sign in (1, -1):
        assert torch.equal(ours == sign * math.inf, theirs == sign * math.inf), f"{what}: infinities differ"
    finite = theirs.isfinite()
    if finite.any():
        assert_as_accurate(ours[finite], theirs[finite], exact[finite], dtype, f"{what} (finite values)", scale=scale)


@pytest.mark.parametrize("slopes", ["1", "C"], ids=["one-slope", "C-slopes"])
@pytest.mark.parametrize("training,layout", [(True, "contiguous"), (False, "contiguous"), (False, "channels_last")],
                         ids=["train", "eval-contiguous", "eval-channels_last"])
def test_nan_and_inf_like_torch(backend, training, layout, slopes):
    """NaN and +-inf input values: in training the channel's statistics (and so its outputs and gradients)
    are NaN, the others finite; in eval each stays where it is, -inf through the channel's slope (0 * inf:
    NaN, as torch's), and dx stays finite where the slope is finite (torch's prelu backward takes a * dy at
    a NaN). Channels-first in training: after an inf, the CUDA channels-last statistics are NaN where torch's
    mean is inf (fusedbn/README.md), as test_bad_input's cases are."""
    case = make_case((2, 3, 4, 4), layout, torch.float32, torch.float32, backend.device, False, slopes, seed=4)
    with torch.no_grad():
        case.x[0, 0, 0, 0] = math.nan
        case.x[1, 1, 1, 1] = math.inf
        if not training:
            case.x[0, 2, 1, 2] = -math.inf
            case.x[1, 0, 3, 3] = -math.inf
            case.x[0, 1, 2, 0] = math.inf
            case.w[1] = -case.w[1]  # alpha < 0: inf -> -inf before the activation
            if slopes == "C":
                case.a.copy_(torch.tensor([0.25, -0.5, 0.0]))  # a zero slope: 0 * -inf
    label = _label(case, training) + ", NaN and inf values"
    theirs, exact = composition(case, training), composition(case, training, exact=True)
    acc = torch.float32
    if training:
        rm, rv = case.rm.clone(), case.rv.clone()
        y, mean, invstd = fusedbn.ops.forward_train(case.x, case.w, case.b, rm, rv, MOMENTUM, EPS,
                                                    activation="prelu", activation_weight=case.a)
        _assert_nonfinite_like(rm, theirs.running_mean, exact.running_mean, acc, f"{label}: running_mean")
        _assert_nonfinite_like(rv, theirs.running_var, exact.running_var, acc, f"{label}: running_var")
    else:
        y = fusedbn.ops.forward_eval(case.x, case.w, case.b, case.rm, case.rv, EPS, activation="prelu",
                                     activation_weight=case.a)
        mean, invstd = case.rm.to(acc), torch.rsqrt(case.rv.to(acc) + EPS)
    _assert_nonfinite_like(y, theirs.output, exact.output, acc, f"{label}: output")
    grads = prelu_backward(case, mean, invstd, training)
    count = case.x.numel() // case.channels
    for name, o in zip(GRADS, grads):
        if name == "residual":
            assert o is None
            continue
        # sums: their finite ones within their count's allowance
        scale = 1.0 if name == "input" else math.sqrt(case.x.numel() if o.numel() == 1 else count)
        _assert_nonfinite_like(o, theirs.grads[name], exact.grads[name], acc, f"{label}: grad_{name}", scale)


# ---- The activation_weight checks: every op refuses, with the exception type of its kind of check (the
# activation's arguments: ValueError, as an unknown activation is; the weight's size, dtype and device:
# RuntimeError, as the BatchNorm parameters' and torch's F.prelu's are) and a message naming the weight, and
# a rejected forward_train leaves the running statistics as they were.

BAD_SLOPES = {
    "prelu-without-weight": ("prelu", lambda a: None, ValueError),
    "prelu-with-activation_param": ("prelu", lambda a: a, ValueError),  # the slopes are the weight's, not a param
    "weight-with-identity": ("identity", lambda a: a, ValueError),
    "weight-with-relu": ("relu", lambda a: a, ValueError),
    "weight-with-silu": ("silu", lambda a: a, ValueError),
    "weight-of-C+1": ("prelu", lambda a: torch.ones(4, dtype=a.dtype, device=a.device), RuntimeError),
    "weight-of-2": ("prelu", lambda a: torch.ones(2, dtype=a.dtype, device=a.device), RuntimeError),
    "empty-weight": ("prelu", lambda a: torch.ones(0, dtype=a.dtype, device=a.device), RuntimeError),
    "float64-weight-float32-input": ("prelu", lambda a: a.double(), RuntimeError),
    "float16-weight-float32-input": ("prelu", lambda a: a.half(), RuntimeError),
    "weight-on-other-device": ("prelu", lambda a: a.cpu() if a.device.type != "cpu" else None, RuntimeError),
}
BAD_OPS = ["forward_train", "forward_eval", "backward", "grad_sums", "backward_elemt"]


def _call(op, case, activation, slopes, mean, invstd, activation_param=0.0):
    kwargs = dict(residual=case.r, activation=activation, activation_param=activation_param, activation_weight=slopes)
    if op == "forward_train":
        return fusedbn.ops.forward_train(case.x, case.w, case.b, case.rm, case.rv, MOMENTUM, EPS, **kwargs)
    if op == "forward_eval":
        return fusedbn.ops.forward_eval(case.x, case.w, case.b, case.rm, case.rv, EPS, **kwargs)
    if op == "backward":
        return fusedbn.ops.backward(case.dy, case.x, case.w, mean, invstd, True, [True, True, True], bias=case.b,
                                    grad_residual=True, grad_activation_weight=slopes is not None, **kwargs)
    if op == "grad_sums":
        return fusedbn.ops.grad_sums(case.dy, case.x, case.w, mean, invstd, bias=case.b, **kwargs)
    return fusedbn.ops.backward_elemt(case.dy, case.x, case.w, mean, invstd, mean, invstd, bias=case.b,
                                      grad_residual=True, **kwargs)


def _bad_case(device, bad):
    case = make_case((2, 3, 4, 5), "contiguous", torch.float32, torch.float32, device, True, "C", seed=5)
    activation, make_slopes, error = BAD_SLOPES[bad]
    return case, activation, make_slopes(case.a), error, 0.25 if bad == "prelu-with-activation_param" else 0.0


@pytest.mark.parametrize("op", BAD_OPS)
@pytest.mark.parametrize("bad", BAD_SLOPES)
def test_bad_activation_weight_is_refused(backend, bad, op):
    if bad == "weight-on-other-device" and backend.device == "cpu":
        pytest.skip("needs the input on a GPU")
    case, activation, slopes, error, param = _bad_case(backend.device, bad)
    mean, invstd = torch.zeros(3, device=backend.device), torch.ones(3, device=backend.device)
    before = (case.rm.clone(), case.rv.clone())
    with pytest.raises(error) as raised:
        _call(op, case, activation, slopes, mean, invstd, param)
    assert "weight" in str(raised.value), f"{bad} ({op}): the message does not name the weight: {raised.value}"
    assert torch.equal(case.rm, before[0]) and torch.equal(case.rv, before[1]), \
        f"{bad} ({op}) changed the running statistics"


@pytest.mark.parametrize("op", BAD_OPS)
@pytest.mark.parametrize("bad", [b for b in BAD_SLOPES if b != "weight-on-other-device"])
@pytest.mark.parametrize("dry_run", ["meta", "fake"])
def test_dry_run_refuses_a_bad_activation_weight_as_a_real_run(dry_run, bad, op):
    case, activation, slopes, error, param = _bad_case("cpu", bad)
    mean, invstd = torch.zeros(3), torch.ones(3)
    if dry_run == "meta":
        def meta(t):
            return None if t is None else t.to("meta")
        with pytest.raises(error):
            _call(op, case.map(meta), activation, meta(slopes), meta(mean), meta(invstd), param)
    else:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            def fake(t):
                return None if t is None else mode.from_tensor(t)
            with pytest.raises(error):
                _call(op, case.map(fake), activation, fake(slopes), fake(mean), fake(invstd), param)


@pytest.mark.parametrize("op", ["backward", "grad_sums", "backward_elemt"])
def test_backward_refuses_the_forward_output_with_prelu(backend, op):
    """The backward reads the forward's output only for relu (its mask); PReLU's slope may be negative or 0,
    so z's sign is recomputed, and an output given is refused as for every other activation."""
    case = make_case((2, 3, 4, 5), "contiguous", torch.float32, torch.float32, backend.device, True, "C", seed=5)
    mean, invstd = torch.zeros(3, device=backend.device), torch.ones(3, device=backend.device)
    kwargs = dict(bias=case.b, output=case.x, residual=case.r, activation="prelu", activation_weight=case.a)
    with pytest.raises(ValueError, match="only for relu"):
        if op == "backward":
            fusedbn.ops.backward(case.dy, case.x, case.w, mean, invstd, True, [True, True, True],
                                 grad_activation_weight=True, **kwargs)
        elif op == "grad_sums":
            fusedbn.ops.grad_sums(case.dy, case.x, case.w, mean, invstd, **kwargs)
        else:
            fusedbn.ops.backward_elemt(case.dy, case.x, case.w, mean, invstd, mean, invstd, **kwargs)
