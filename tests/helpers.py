"""What the tests share: the accuracy oracle against float64 (tolerances per dtype, the dtype pairs the
equivalence tests run), the three-way comparison every equivalence test runs (`Trio`), and input
builders."""
import copy
import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedbn

# Accuracy oracle: torch computes the same thing in float64; fusedbn's largest error against that must be
# within twice torch's own largest error in the tested dtype, plus a floor for cases where torch happens to
# be exact: `atol` (a few units in the last place of the dtype near 1) and a few units in the last place at
# the result's magnitude. `rtol`/`atol` are also used
# where two results must simply agree.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOLERANCES)
ERROR_RATIO = 2.0
# (input dtype, parameter dtype): every dtype with its own parameters, and half precision with float32 ones.
DTYPE_PAIRS = [(d, d) for d in DTYPES] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
over_dtype_pairs = pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS,
                                           ids=[f"{str(a)[6:]}-params-{str(b)[6:]}" for a, b in DTYPE_PAIRS])


def assert_close(actual, expected, dtype, msg=""):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"], msg=lambda m: f"{msg}\n{m}")


def assert_as_accurate(ours, theirs, exact, dtype, msg="", scale=1.0, slack=0.0):
    """max|ours - exact| <= ERROR_RATIO * max|theirs - exact| + atol * scale + slack, with `exact` in
    float64. `scale` is sqrt(count) for sums over `count` values (weight/bias gradients), whose rounding
    error grows with the count; `slack` covers terms whose exact value is ill-defined at the dtype's
    precision (a relu mask where the pre-activation rounds to either side of zero)."""
    assert ours.dtype == theirs.dtype, f"{msg}: dtype {ours.dtype} vs {theirs.dtype}"
    if ours.numel() == 0:
        assert theirs.numel() == 0
        return
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    if math.isnan(err_theirs):  # torch overflowed (e.g. float16 sums) where float64 did not: any finite error is better
        err_theirs = math.inf
    # Rounding the result itself to `dtype` costs up to half a unit in the last place at its magnitude.
    rounding = 4 * torch.finfo(dtype).eps * exact.abs().max().item()
    bound = ERROR_RATIO * err_theirs + TOLERANCES[dtype]["atol"] * scale + rounding + slack
    assert err_ours <= bound, f"{msg}: fusedbn error {err_ours:.3g} > {bound:.3g} (torch's error {err_theirs:.3g})"


def _leaf(t):
    """A fresh leaf over the same memory (strides, storage offset and alignment kept), gradient wanted."""
    return None if t is None else t.detach().requires_grad_(True)


def _same(t):
    return t


class Trio:
    """torch's module (``ref``), fusedbn's (``ours``) and torch's in float64 (``exact``, the oracle; by default
    a float64 copy of ``ref``), run on the same inputs and output gradient. ``norms``: the three batch norms
    holding the parameters and buffers, where the modules wrap them (torch's unfused BN + activation).

    ``run`` does one forward and backward of each; ``check`` asserts fusedbn is as accurate as torch
    (assert_as_accurate) on the output, every input's gradient, the parameters' gradients and the running
    statistics, and that num_batches_tracked agrees; ``step`` is both."""

    def __init__(self, ref, ours, exact=None, norms=None):
        self.modules = (ref, ours, copy.deepcopy(ref).double() if exact is None else exact)
        self.norms = self.modules if norms is None else norms

    def train(self, mode=True):
        for module in self.modules:
            module.train(mode)

    def run(self, inputs, grad, part=_same):
        """Per module, [output, gradient of each input]; ``inputs`` a tensor or a tuple (input, residual or
        None). ``ours`` runs on ``part`` of every tensor (one process's share of the batch)."""
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        results = []
        for index, module in enumerate(self.modules):
            cast = (lambda t: t.double()) if index == 2 else part if index == 1 else _same
            leaves = [_leaf(None if t is None else cast(t)) for t in inputs]
            output = module(*leaves)
            output.backward(cast(grad))
            results.append([output] + [None if t is None else t.grad for t in leaves])
        return results

    def check(self, results, label, *, slack=None, part=_same, either_side=None, parameter_grad=_same):
        """``slack``: extra allowance per quantity ("output", "grad_input", "grad_weight", ...) where its exact
        value is ill-defined at the dtype's precision; ``either_side``: a mask of elements whose input
        gradients may take either value (an activation's kink), set to the exact one before comparing;
        ``part``/``parameter_grad``: what of torch's results ``ours`` computed (its share of the batch; its
        parameter gradients summed over the processes)."""
        slack = slack or {}
        theirs, mine, best = results
        for name, t, o, b in zip(("output", "grad_input", "grad_residual"), theirs, mine, best):
            if b is None:
                continue
            t, b = part(t), part(b)
            if either_side is not None and name != "output":
                t, o = (torch.where(part(either_side), b.to(v.dtype), v) for v in (t, o))
            assert_as_accurate(o, t, b, t.dtype, f"{label}: {name}", slack=slack.get(name, 0.0))
        ref = self.norms[0]
        if ref.affine:
            # Sums over the count values of a channel: their rounding error grows with sqrt(count).
            scale = math.sqrt(max(1, theirs[0].numel() // max(1, theirs[0].shape[1])))
            for name in ("weight", "bias"):
                t, o, b = (getattr(m, name).grad for m in self.norms)
                o = parameter_grad(o)
                assert_as_accurate(o, t, b, t.dtype, f"{label}: grad_{name}", scale, slack.get(f"grad_{name}", 0.0))
            for m in self.norms:
                m.zero_grad()
        if ref.running_mean is not None:
            for name in ("running_mean", "running_var"):
                t, o, b = (getattr(m, name) for m in self.norms)
                assert_as_accurate(o, t, b, t.dtype, f"{label}: {name}", slack=slack.get(name, 0.0))
        if ref.num_batches_tracked is not None:
            assert torch.equal(self.norms[1].num_batches_tracked, ref.num_batches_tracked), label

    def step(self, inputs, grad, label, *, part=_same, **allowances):
        results = self.run(inputs, grad, part)
        self.check(results, label, part=part, **allowances)
        return results


# torch's BatchNorm module and fusedbn's drop-in for it, by module dims (1d: (N, C) or (N, C, L) input).
BATCH_NORMS = {1: (torch.nn.BatchNorm1d, fusedbn.FusedBatchNorm1d), 2: (torch.nn.BatchNorm2d, fusedbn.FusedBatchNorm2d),
               3: (torch.nn.BatchNorm3d, fusedbn.FusedBatchNorm3d)}

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, layout, dtype, device, mean=0.0, std=1.0, generator=None):
    """A tensor of `shape` whose memory is channels-first contiguous, channels-last (C innermost), or a
    non-dense strided view (every other element of a larger tensor, with a skewed storage offset)."""
    if layout == "channels_last":
        perm = [0] + list(range(2, len(shape))) + [1]  # (N, *S, C)
        base = torch.randn([shape[p] for p in perm], generator=generator, dtype=torch.float64)
        x = base.permute([perm.index(d) for d in range(len(shape))])
    elif layout == "strided":
        big = torch.randn([*shape[:-1], 2 * shape[-1] + 1], generator=generator, dtype=torch.float64)
        x = big[..., 1::2]
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (x * std + mean).to(device=device, dtype=dtype)


def memory_layout_matches(a, b):
    """Whether a and b put their elements in the same memory order (same strides on the dims that matter)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def is_dense(x):
    """Channels-first contiguous or channels-last (C innermost, the rest contiguous)."""
    return x.is_contiguous() or x.movedim(1, -1).is_contiguous()


def misaligned_copy(x):
    """A copy of dense `x` with the same strides whose data starts one element into its storage, so the
    pointer is not 16-byte aligned (as a slice of a larger tensor can be)."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = storage[1:].as_strided(x.shape, x.stride())
    return y.copy_(x)


def assert_same_state(model, reference, **tolerance):
    """Every entry of ``model``'s state_dict (parameters and buffers) close to ``reference``'s, in order, with
    assert_close's default tolerances for the dtype or the given ``rtol``/``atol``."""
    for (name, mine), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(mine, theirs, msg=name, **tolerance)


def assert_same_grads(model, reference, **tolerance):
    """Every parameter gradient of ``model`` close to ``reference``'s, as assert_same_state compares."""
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, msg=name, **tolerance)


def randomize_batch_norms(model, seed=0):
    """``model`` with non-trivial running statistics and affine parameters in every BatchNorm, as a trained
    model has (seeded: the same values every run)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model


def torchvision_models():
    """torchvision.models, or the calling test skipped (with the reason) where torchvision is not installed."""
    return pytest.importorskip("torchvision", reason="the model tests need torchvision: pip install .[test]").models


OP_NAMES = ("forward_train", "forward_eval", "backward", "batch_stats", "grad_sums", "backward_elemt")


def route_ops(library: str, set_attribute=setattr) -> None:
    """The one switch of the library fusedbn's Python calls: ``fusedbn.ops.*`` set to ``torch.ops.<library>``'s
    ops ("fusedbn", or the emulator's "fusedbn_simt": the same schemas). ``set_attribute``: e.g. a
    monkeypatch's setattr, so a test's switch is undone after it."""
    import fusedbn
    set_attribute(fusedbn.ops, "namespace", library)  # the ops fusedbn._C's eager autograd calls
    for name in OP_NAMES:
        set_attribute(fusedbn.ops, name, getattr(getattr(torch.ops, library), name))



class FusedbnOps(TorchDispatchMode):
    """Counts the fusedbn ops (either library: the compiled or the emulator's) dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("fusedbn", "fusedbn_simt"):
            self.counts[func.name().split("::")[1]] += 1
        return func(*args, **(kwargs or {}))
