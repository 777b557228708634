"""Every public entry point against every class of bad input, with torch as the oracle: where torch raises,
we raise the same exception type and leave every buffer as it was; where torch computes (NaN/Inf values,
momentum outside [0, 1], a negative eps, empty batches, strided parameters), we compute the same values,
NaN where torch has NaN."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedbn


class _Functional(nn.BatchNorm2d):
    """nn.BatchNorm2d's state, its forward a functional batch norm called with that state."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                       self.momentum, self.eps)


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
}


def _x(*shape, dtype=torch.float32, fill=None):
    def make(device):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
        if fill is not None:
            fill(x)
        return x.to(dtype)
    return make


def _nan_and_inf(x):
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 1, 1] = float("inf")


def _strided_weight(module):
    module.weight = nn.Parameter(torch.randn(2 * module.num_features, device=module.weight.device)[::2])


def _float64_weight(module):
    module.weight = nn.Parameter(module.weight.detach().double())


# name -> (make_x(device), module options, change to the module, training)
BAD_INPUTS = {
    "wrong-dims": (_x(2, 3, 4), {}, None, True),
    "channel-mismatch": (_x(2, 4, 4, 4), {}, None, True),
    "int64-input": (_x(2, 3, 4, 4, dtype=torch.int64), {}, None, True),
    "bool-input": (_x(2, 3, 4, 4, dtype=torch.bool), {}, None, True),
    "complex-input": (_x(2, 3, 4, 4, dtype=torch.complex64), {}, None, True),
    "nan-and-inf-values": (_x(2, 3, 4, 4, fill=_nan_and_inf), {}, None, True),
    "nan-and-inf-values-eval": (_x(2, 3, 4, 4, fill=_nan_and_inf), {}, None, False),
    "float64-weight": (_x(2, 3, 4, 4), {}, _float64_weight, True),
    "strided-weight": (_x(2, 3, 4, 4), {}, _strided_weight, True),
    "one-value-per-channel": (_x(1, 3, 1, 1), {}, None, True),
    "empty-batch": (_x(0, 3, 4, 4), {}, None, True),
    "zero-size-spatial": (_x(2, 3, 0, 4), {}, None, True),
    "momentum-above-1": (_x(2, 3, 4, 4), dict(momentum=2.0), None, True),
    "momentum-below-0": (_x(2, 3, 4, 4), dict(momentum=-0.5), None, True),
    "negative-eps": (_x(2, 3, 4, 4), dict(eps=-10.0), None, True),
    "negative-eps-eval": (_x(2, 3, 4, 4), dict(eps=-10.0), None, False),
}
# FusedSyncBatchNorm takes any (N, C, *) input, as nn.SyncBatchNorm does.
SKIP = {("wrong-dims", "FusedSyncBatchNorm")}


def _run(module, x):
    try:
        return module(x), None
    except Exception as error:  # noqa: BLE001 - the oracle is whatever torch does
        return None, error


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_input_like_torch(device, entry, bad):
    if (bad, entry) in SKIP:
        pytest.skip("accepted by design, as by nn.SyncBatchNorm")
    make_ours, make_torch = ENTRY_POINTS[entry]
    make_x, options, change, training = BAD_INPUTS[bad]
    modules = []
    for make in (make_torch, make_ours):
        torch.manual_seed(0)
        module = make(num_features=3, **options).to(device).train(training)
        if change is not None:
            torch.manual_seed(1)
            change(module)
        modules.append(module)
    theirs, ours = modules
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    (expected, torch_error), (result, our_error) = _run(theirs, make_x(device)), _run(ours, make_x(device))
    if torch_error is not None:
        assert isinstance(our_error, type(torch_error)), f"torch raised {torch_error!r}, we {our_error!r}"
        assert str(our_error), "an error without a message"
        for name, value in ours.state_dict().items():
            assert torch.equal(value, before[name]), f"{name} changed by a rejected call"
        return
    assert our_error is None, f"torch computed, we raised {our_error!r}"
    _assert_same(result, expected, "output")
    for (name, mine), (_, torch_value) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        _assert_same(mine, torch_value, name)


def _assert_same(ours, theirs, name):
    """Equal values, non-finite exactly where torch's are. A deliberate difference: where a channel holds
    an infinite value, the CUDA kernels' Welford merge (inf - inf) makes its mean NaN where torch's is
    inf; both are non-finite, as is the channel's output and variance in both."""
    assert torch.equal(ours.isfinite(), theirs.isfinite()), f"{name}: non-finite values differ"
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5, msg=name)
