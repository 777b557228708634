"""Every public entry point against every class of bad input, with torch as the oracle: where torch raises,
we raise the same exception type and leave every buffer bit for bit as it was; where torch computes (NaN/Inf
values, momentum outside [0, 1] or beyond float32, a negative eps, empty batches, strided or oddly shaped
parameters, buffers made under inference mode), we compute the same output, gradients and buffers (NaN and
inf where torch has them), with the same strides. The meta device and FakeTensor tracing raise what a real
run raises."""
import re
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedbn
from helpers import BATCH_NORMS, memory_layout_matches


class _Functional(nn.BatchNorm2d):
    """nn.BatchNorm2d's state, its forward a functional batch norm called with that state."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                       self.momentum, self.eps)


def _ops_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """The ops themselves, as F.batch_norm would call them (called directly, so not differentiated here:
    test_torch_integration's opcheck checks their autograd)."""
    if training:
        return fusedbn.ops.forward_train(x, weight, bias, running_mean, running_var, momentum, eps)[0]
    return fusedbn.ops.forward_eval(x, weight, bias, running_mean, running_var, eps)


def _relu_after(module):
    forward = module.forward
    module.forward = lambda x: torch.relu(forward(x))
    return module


# name -> (ours(**kwargs), torch's equivalent(**kwargs))
ENTRY_POINTS = {
    "FusedBatchNorm2d": (fusedbn.FusedBatchNorm2d, nn.BatchNorm2d),
    "FusedBatchNormReLU2d": (fusedbn.FusedBatchNormReLU2d, lambda **kw: _relu_after(nn.BatchNorm2d(**kw))),
    "FusedSyncBatchNorm": (fusedbn.FusedSyncBatchNorm, nn.BatchNorm2d),
    "batch_norm": (lambda **kw: _Functional(fusedbn.batch_norm, **kw), lambda **kw: _Functional(F.batch_norm, **kw)),
    "batch_norm_relu": (
        lambda **kw: _Functional(lambda *a: fusedbn.batch_norm_relu(*a), **kw),
        lambda **kw: _Functional(lambda *a: torch.relu(F.batch_norm(*a)), **kw)),
    "ops": (lambda **kw: _Functional(_ops_batch_norm, **kw), lambda **kw: _Functional(F.batch_norm, **kw)),
}


def _x(*shape, dtype=torch.float32, fill=None, memory_format=torch.contiguous_format):
    def make(device):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        if fill is not None:
            fill(x)
        return x.to(dtype).to(memory_format=memory_format)
    return make


def _nan_and_inf(x):
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 1, 1] = float("inf")


def _inf_first(x):
    x[0, 1, 0, 0] = float("inf")  # the channel's first value: torch's running_mean is inf, not NaN


def _set(name, make):
    """Replaces the module's `name` (parameter or buffer) by make(old)."""
    def change(module):
        old = getattr(module, name)
        new = make(old.detach())
        setattr(module, name, nn.Parameter(new) if isinstance(old, nn.Parameter) else new)
    return change


def _inference_buffers(module):
    with torch.inference_mode():
        module.running_mean = module.running_mean.clone()
        module.running_var = module.running_var.clone()


def _strided(t):
    return torch.randn(2 * t.numel(), device=t.device, generator=torch.Generator().manual_seed(1)).to(t.device)[::2]


# name -> (make_x(device), module options, change to the module, training)
BAD_INPUTS = {
    "0-d-input": (_x(), {}, None, True),
    "1-d-input": (_x(3), {}, None, True),
    "1-d-input-eval": (_x(3), {}, None, False),
    "wrong-dims": (_x(2, 3, 4), {}, None, True),
    "channel-mismatch": (_x(2, 4, 4, 4), {}, None, True),
    "int64-input": (_x(2, 3, 4, 4, dtype=torch.int64), {}, None, True),
    "bool-input": (_x(2, 3, 4, 4, dtype=torch.bool), {}, None, True),
    "complex-input": (_x(2, 3, 4, 4, dtype=torch.complex64), {}, None, True),
    "nan-and-inf-values": (_x(2, 3, 4, 4, fill=_nan_and_inf), {}, None, True),
    "nan-and-inf-values-eval": (_x(2, 3, 4, 4, fill=_nan_and_inf), {}, None, False),
    "inf-first-value": (_x(2, 3, 4, 4, fill=_inf_first), {}, None, True),
    "float64-weight": (_x(2, 3, 4, 4), {}, _set("weight", lambda w: w.double()), True),
    "float64-bias": (_x(2, 3, 4, 4), {}, _set("bias", lambda b: b.double()), True),
    "float64-running_mean": (_x(2, 3, 4, 4), {}, _set("running_mean", lambda m: m.double()), True),
    "float64-running_var-eval": (_x(2, 3, 4, 4), {}, _set("running_var", lambda v: v.double()), False),
    "weight-of-4": (_x(2, 3, 4, 4), {}, _set("weight", lambda w: torch.ones(4, device=w.device)), True),
    "bias-of-4": (_x(2, 3, 4, 4), {}, _set("bias", lambda b: torch.ones(4, device=b.device)), True),
    "strided-weight": (_x(2, 3, 4, 4), {}, _set("weight", _strided), True),
    "weight-(C,1)": (_x(2, 3, 4, 4), {}, _set("weight", lambda w: _strided(w).view(3, 1)), True),
    "bias-(1,C)-eval": (_x(2, 3, 4, 4), {}, _set("bias", lambda b: torch.randn_like(b).view(1, 3)), False),
    "running_var-(C,1)": (_x(2, 3, 4, 4), {}, _set("running_var", lambda v: v.view(3, 1)), True),
    "running_var-(C,1)-eval": (_x(2, 3, 4, 4), {}, _set("running_var", lambda v: v.view(3, 1)), False),
    "running_mean-0-d": (_x(2, 1, 4, 4), dict(num_features=1), _set("running_mean", lambda m: m[0]), True),
    "running_var-requires-grad": (_x(2, 3, 4, 4), {}, _set("running_var", lambda v: v.requires_grad_()), True),
    "running_mean-requires-grad-eval": (
        _x(2, 3, 4, 4), {}, _set("running_mean", lambda m: m.requires_grad_()), False),
    "inference-mode-buffers": (_x(2, 3, 4, 4), {}, _inference_buffers, True),
    "expanded-running_var": (_x(2, 3, 4, 4), {}, _set("running_var", lambda v: v[:1].expand(3)), True),
    "one-value-per-channel": (_x(1, 3, 1, 1), {}, None, True),
    "empty-batch": (_x(0, 3, 4, 4), {}, None, True),
    "empty-batch-channels-last": (_x(0, 5, 2, 2, memory_format=torch.channels_last), dict(num_features=5), None,
                                  True),
    "empty-float64-float32-params": (_x(0, 3, 4, 4, dtype=torch.float64), {}, None, True),
    "float64-float32-params": (_x(2, 3, 4, 4, dtype=torch.float64), {}, None, True),
    "zero-size-spatial": (_x(2, 3, 0, 4), {}, None, True),
    "size-1-spatial": (_x(4, 3, 1, 1), {}, None, True),
    "size-1-spatial-channels-last": (_x(4, 3, 1, 1, memory_format=torch.channels_last), {}, None, True),
    "momentum-above-1": (_x(2, 3, 4, 4), dict(momentum=2.0), None, True),
    "momentum-below-0": (_x(2, 3, 4, 4), dict(momentum=-0.5), None, True),
    "momentum-beyond-float32": (_x(2, 3, 4, 4), dict(momentum=1e39), None, True),
    "negative-eps": (_x(2, 3, 4, 4), dict(eps=-10.0), None, True),
    "negative-eps-eval": (_x(2, 3, 4, 4), dict(eps=-10.0), None, False),
}
# The gist of torch's message (on the CPU: torch's CUDA path words some through cuDNN), which ours must have too.
MESSAGES = {
    "wrong-dims": r"expected 4D input \(got 3D input\)",
    "channel-mismatch": r"should contain 4 elements not 3",
    "one-value-per-channel": r"Expected more than 1 value per channel when training",
    "int64-input": r"not implemented for 'Long'",
    "bool-input": r"not implemented for 'Bool'",
    "float64-weight": r"mixed dtype",
    "weight-of-4": r"weight should contain 3 elements not 4",
    "bias-of-4": r"bias should contain 3 elements not 4",
}
# Accepted by design: FusedSyncBatchNorm takes any (N, C, *) input, as nn.SyncBatchNorm does.
SKIP = {("wrong-dims", "FusedSyncBatchNorm"): "accepted by design, as by nn.SyncBatchNorm"}
# The ops are the strict layer under the functional API: torch's leniency on empty batches (any parameter
# dtype or size, integer input) and its IndexError for 1-D training input are the functional API's.
for _bad in ("empty-float64-float32-params", "0-d-input", "1-d-input"):
    SKIP[(_bad, "ops")] = "the ops check every empty batch as a full one, and raise RuntimeError for < 2 dims"
# Where torch fails an internal assert (Normalization.cpp, a (C, 1) weight beside running statistics in
# training) and we compute: test_parameters_of_any_shape checks ours against the flat weight.
for _entry in ENTRY_POINTS:
    SKIP[("weight-(C,1)", _entry)] = "torch fails an internal assert; see test_parameters_of_any_shape"
# Where torch computes and we raise, deliberately: torch writes every channel's statistic into the one
# memory location of an expanded running_var (the last channel wins); we refuse, before any write.
RAISE_WHERE_TORCH_COMPUTES = {"expanded-running_var": RuntimeError}


def _modules(entry, bad, device):
    make_ours, make_torch = ENTRY_POINTS[entry]
    make_x, options, change, training = BAD_INPUTS[bad]
    options = dict(dict(num_features=3), **options)
    modules = []
    for make in (make_torch, make_ours):
        torch.manual_seed(0)
        module = make(**options).to(device).train(training)
        if change is not None:
            torch.manual_seed(1)
            change(module)
        modules.append(module)
    return modules, make_x


# Run under no_grad, where torch computes: with autograd, torch's BatchNorm cannot save an inference-mode
# buffer for backward (it raises, after updating it), fails an internal assert on a (C, 1) weight and returns
# a gradient of the wrong shape for a (1, C) bias; ours computes all three (test_parameters_of_any_shape).
NO_GRAD = {"inference-mode-buffers", "weight-(C,1)", "bias-(1,C)-eval"}


def _run(module, x, differentiate=True):
    """(output, grads of (x, weight, bias) for a fixed upstream gradient, error)."""
    x = x.detach().requires_grad_(x.is_floating_point() and differentiate)
    try:
        y = module(x)
    except Exception as error:  # noqa: BLE001 - the oracle is whatever torch does
        return None, None, error
    grads = None
    if differentiate and y.requires_grad:
        params = [t for t in (x, module.weight, module.bias) if t is not None and t.requires_grad]
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
        grads = torch.autograd.grad(y, params, upstream, allow_unused=True)
    return y, grads, None


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_input_like_torch(device, entry, bad):
    if (bad, entry) in SKIP:
        pytest.skip(SKIP[bad, entry])
    (theirs, ours), make_x = _modules(entry, bad, device)
    before = _state(ours)
    differentiate = bad not in NO_GRAD and entry != "ops"
    with torch.set_grad_enabled(bad not in NO_GRAD):
        expected, expected_grads, torch_error = _run(theirs, make_x(device), differentiate)
        result, grads, our_error = _run(ours, make_x(device), differentiate)
    if torch_error is not None or bad in RAISE_WHERE_TORCH_COMPUTES:
        _assert_rejected_like_torch(RAISE_WHERE_TORCH_COMPUTES.get(bad, torch_error), our_error, ours, before,
                                    MESSAGES.get(bad), device)
        return
    assert our_error is None, f"torch computed, we raised {our_error!r}"
    _assert_same(result, expected, "output")
    for i, (mine, torch_grad) in enumerate(zip(grads or (), expected_grads or ())):
        if torch_grad is not None:
            _assert_same(mine, torch_grad, f"gradient {i}")
    for (name, mine), (_, torch_value) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        _assert_same(mine, torch_value, name)


def _assert_rejected_like_torch(torch_error, our_error, ours, before, message, device):
    """Ours raised torch's exception type (``torch_error``: torch's exception, or the type expected where
    torch computes), with ``message`` (a regex: torch's gist) in it, and left every state bit as it was."""
    error_type = torch_error if isinstance(torch_error, type) else type(torch_error)
    assert isinstance(our_error, error_type), f"torch raised {torch_error!r}, we {our_error!r}"
    assert str(our_error), "an error without a message"
    if message is not None:
        if device == "cpu":
            assert re.search(message, str(torch_error)), f"torch's message changed: {torch_error}"
        assert re.search(message, str(our_error)), our_error
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a rejected call"


# The other modules' dims, in torch's words (FusedBatchNorm2d's are BAD_INPUTS' "wrong-dims").
DIMS = {"1d": (*BATCH_NORMS[1], (2, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\)"),
        "3d": (*BATCH_NORMS[3], (2, 3, 4, 4), r"expected 5D input \(got 4D input\)")}


@pytest.mark.parametrize("dims", DIMS)
def test_input_dims_of_each_module_like_torch(device, dims):
    torch_cls, fused_cls, shape, message = DIMS[dims]
    theirs, ours = torch_cls(3, device=device), fused_cls(3, device=device)
    before = _state(ours)
    *_, torch_error = _run(theirs, _x(*shape)(device))
    *_, our_error = _run(ours, _x(*shape)(device))
    _assert_rejected_like_torch(torch_error, our_error, ours, before, message, device)


def _assert_same(ours, theirs, name):
    """Equal values, the same shape and strides, NaN and infinities (with their signs) exactly where torch's
    are. A deliberate difference: the CUDA channels-last statistics take one value at a time, so after an
    infinite value a channel's mean is NaN where torch's (a sum) is inf; the cases here are channels-first."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, f"{name}: {ours.shape} {ours.dtype} vs " \
                                                                      f"{theirs.shape} {theirs.dtype}"
    assert memory_layout_matches(ours, theirs), f"{name}: strides {ours.stride()} vs {theirs.stride()}"
    assert torch.equal(ours.isnan(), theirs.isnan()), f"{name}: NaNs differ"
    assert torch.equal(ours.isinf() & (ours > 0), theirs.isinf() & (theirs > 0)), f"{name}: infinities differ"
    assert torch.equal(ours.isinf() & (ours < 0), theirs.isinf() & (theirs < 0)), f"{name}: infinities differ"
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5, msg=name)


# Dry runs raise what real runs raise, and describe the real output. FusedSyncBatchNorm's and the
# functional API's checks before the ops are Python; the ops' checks run in their meta kernels.
# Module.to("meta") makes an expanded buffer dense and cannot hold inference tensors; and under FakeTensor
# tracing a NotImplementedError from an op's meta kernel reads as "no fake kernel" (torch re-raises it as
# UnsupportedOperatorException, a RuntimeError), which the functional API avoids by checking the dtype first.
# An empty channels-last batch's output is torch's own input.clone() * weight[0], which torch's meta kernels
# lay out channels-first and its CPU kernels channels-last (F.batch_norm does the same).
DRY_SKIP = {("meta", "expanded-running_var"), ("meta", "inference-mode-buffers"), ("fake", "inference-mode-buffers"),
            ("meta", "empty-batch-channels-last"), ("fake", "empty-batch-channels-last")}
DRY_SKIP |= {("fake", bad, "ops") for bad in ("int64-input", "bool-input", "complex-input")}


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dry_run", ["meta", "fake"])
def test_dry_run_raises_as_a_real_run(entry, bad, dry_run):
    if (bad, entry) in SKIP:
        pytest.skip(SKIP[bad, entry])
    if (dry_run, bad) in DRY_SKIP or (dry_run, bad, entry) in DRY_SKIP:
        pytest.skip("not representable in this dry run")
    (_, real), make_x = _modules(entry, bad, "cpu")
    (_, dry), _ = _modules(entry, bad, "cpu")
    expected, _, real_error = _run(real, make_x("cpu"))
    x = make_x("cpu")
    if dry_run == "meta":
        dry.to("meta")
        result, _, dry_error = _run(dry, x.to("meta"))
    else:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            result, _, dry_error = _run(dry, mode.from_tensor(x))
    if real_error is not None:
        assert isinstance(dry_error, type(real_error)), f"a real run raised {real_error!r}, a {dry_run} run {dry_error!r}"
        return
    assert dry_error is None, f"a real run computed, a {dry_run} run raised {dry_error!r}"
    assert result.shape == expected.shape and result.dtype == expected.dtype
    assert memory_layout_matches(result, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put a parameter elsewhere")
@pytest.mark.parametrize("param", ["weight", "running_mean"])
@pytest.mark.parametrize("input_device", ["cpu", "cuda"])
def test_parameter_on_another_device(param, input_device):
    other = "cuda" if input_device == "cpu" else "cpu"
    tensors = dict(weight=torch.ones(3, device=input_device), running_mean=torch.zeros(3, device=input_device),
                   running_var=torch.ones(3, device=input_device))
    tensors[param] = tensors[param].to(other)
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        fusedbn.batch_norm(torch.randn(2, 3, 4, 4, device=input_device), tensors["running_mean"],
                           tensors["running_var"], tensors["weight"], training=True)
    assert all(torch.equal(before[k], v) for k, v in tensors.items())


def test_running_mean_without_running_var_like_torch():
    x = torch.randn(2, 3)
    for training, error in ((True, ValueError), (False, RuntimeError)):
        for fn in (F.batch_norm, fusedbn.batch_norm):
            with pytest.raises(error):
                fn(x, torch.zeros(3), None, training=training)


def test_batch_norm_relu_rejects_a_residual_before_updating_statistics(device):
    module = fusedbn.FusedBatchNormReLU2d(3).to(device)
    before = _state(module)
    x = torch.randn(4, 3, 5, 5, device=device)
    with pytest.raises(RuntimeError):
        torch.relu(nn.BatchNorm2d(3).to(device)(x) + torch.randn(4, 3, 5, 4, device=device))
    with pytest.raises(RuntimeError):
        module(x, torch.randn(4, 3, 5, 4, device=device))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    # A residual that broadcasts is added (unfused), as `+` would.
    r = torch.randn(1, 3, 1, 1, device=device)
    reference = nn.BatchNorm2d(3).to(device)
    torch.testing.assert_close(module(x, r), torch.relu(reference(x) + r))


def test_threads_training_one_module_leave_a_serial_result(device):
    """Four threads, one call each on the same module: its statistics equal those of the calls run one
    after another in some order (nn.BatchNorm2d's do). The order is found by trying every one.
    (With momentum=None the factor comes from num_batches_tracked, read in Python before the call, as
    nn.BatchNorm2d reads it: neither serializes that.)"""
    import itertools

    torch.manual_seed(0)
    batches = [torch.randn(8, 4, 16, 16, device=device) * (i + 1) + i for i in range(4)]
    serial_results = []
    for order in itertools.permutations(range(len(batches))):
        serial = fusedbn.FusedBatchNorm2d(4).to(device)
        with torch.no_grad():
            for i in order:
                serial(batches[i])
        serial_results.append((serial.running_mean, serial.running_var))
    for trial in range(50):
        module = fusedbn.FusedBatchNorm2d(4).to(device)
        barrier = threading.Barrier(len(batches))

        def train(x):
            barrier.wait()
            with torch.no_grad():
                module(x)

        threads = [threading.Thread(target=train, args=(x,)) for x in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert any(torch.allclose(module.running_mean, mean, rtol=1e-6, atol=1e-7)
                   and torch.allclose(module.running_var, var, rtol=1e-6, atol=1e-7)
                   for mean, var in serial_results), f"trial {trial}: no serial order gives these statistics"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 1), (1, 3), (1, 3, 1, 1)])
def test_parameters_of_any_shape(device, shape, training):
    """weight and bias of any shape with C elements, as torch reads them: the same output and gradients as
    with the flat (C,) parameters, the gradients in the parameters' own shape (torch itself fails this under
    autograd: see NO_GRAD)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen).to(device)
    w, b = (torch.randn(3, generator=gen).to(device) for _ in range(2))
    rm, rv = torch.randn(3, generator=gen).to(device), torch.rand(3, generator=gen).to(device) + 0.5
    results = []
    for weight, bias in ((w.view(shape), b.view(shape)), (w, b)):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, weight, bias))
        y = fusedbn.batch_norm(xg, rm.clone(), rv.clone(), wg, bg, training=training)
        y.backward(torch.ones_like(y).cumsum(-1))
        results.append((y, xg.grad, wg.grad, bg.grad))
    (y, dx, dw, db), (y_flat, dx_flat, dw_flat, db_flat) = results
    assert dw.shape == shape and db.shape == shape
    for ours, flat in ((y, y_flat), (dx, dx_flat), (dw.reshape(-1), dw_flat), (db.reshape(-1), db_flat)):
        torch.testing.assert_close(ours, flat, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(y, F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training))


@pytest.mark.parametrize("shape", [(0, 3, 1024), (0, 3, 4, 4), (2, 3, 0, 1024)])
def test_ops_on_empty_batches_return_zero_gradient_sums(device, shape):
    """The ops themselves on a batch with no values: parameter gradients are empty sums (zeros, as torch's),
    also for runs long enough to take the chunked reduction, PReLU's weight's among them."""
    x = torch.randn(shape, device=device)
    mean, invstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    slopes = torch.rand(3, device=device)
    for _ in range(2):  # a second call would see whatever the first left on the stack
        sum_dz, sum_dz_xmu, _ = fusedbn.ops.grad_sums(x, x, None, mean, invstd)
        _, grad_weight, grad_bias, *_ = fusedbn.ops.backward(x, x, torch.ones(3, device=device), mean, invstd, True,
                                                            [True, True, True])
        *_, sum_dslope = fusedbn.ops.grad_sums(x, x, None, mean, invstd, activation="prelu", activation_weight=slopes)
        *_, grad_slopes = fusedbn.ops.backward(x, x, None, mean, invstd, True, [True, True, True], activation="prelu",
                                               activation_weight=slopes, grad_activation_weight=True)
        for t in (sum_dz, sum_dz_xmu, grad_weight, grad_bias, sum_dslope, grad_slopes):
            assert torch.equal(t, torch.zeros(3, device=device))


def test_empty_batch_needs_nothing_else_like_torch():
    """torch returns an empty batch's clone before it looks at the running statistics."""
    x = torch.randn(0, 3, 4)
    for fn in (F.batch_norm, fusedbn.batch_norm):
        assert fn(x, None, None, training=False).shape == x.shape
        assert fn(x, torch.zeros(3), torch.ones(3, requires_grad=True), training=True).shape == x.shape


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,memory_format", [((2, 3, 1, 1), torch.channels_last), ((16, 1, 4, 1), None),
                                                 ((4, 3, 5, 5), torch.channels_last), ((4, 3, 5), None)])
def test_meta_backward_describes_the_real_one(shape, memory_format, training, relu):
    """The backward's meta kernel gives each gradient the real kernel's strides, size-1 dims included."""
    x = torch.randn(shape)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    dy = torch.randn(shape)  # channels-first, whatever x is
    w, mean, invstd = torch.rand(shape[1]) + 0.5, torch.zeros(shape[1]), torch.ones(shape[1])
    # output_mask, bias, output, residual, activation, activation_param, grad_residual
    options = ([True, True, True], None, None, None, "relu" if relu else "identity", 0.0, True)
    real = fusedbn.ops.backward(dy, x, w, mean, invstd, training, *options)
    meta = fusedbn.ops.backward(*(t.to("meta") for t in (dy, x, w, mean, invstd)), training, *options)
    assert [r is None for r in real] == [m is None for m in meta] == [False] * 4 + [True]
    for r, m in zip(real[:4], meta[:4]):
        assert r.shape == m.shape and r.dtype == m.dtype and r.stride() == m.stride()
