"""Bad input: the same exception type and message gist as nn.BatchNorm, and nothing half-updated."""
import re

import pytest
import torch
from torch import nn

import fusedbn


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _raise_like_torch(torch_module, fused_module, make_x):
    """Both modules raise the same exception type with the same message gist; ours changes no state."""
    with pytest.raises(Exception) as expected:
        torch_module(make_x())
    before = _state(fused_module)
    with pytest.raises(type(expected.value)) as ours:
        fused_module(make_x())
    after = _state(fused_module)
    assert all(torch.equal(before[k], after[k]) for k in before), "state changed by a rejected call"
    return str(expected.value), str(ours.value)


CASES = {
    "3d-input-to-2d": (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d, 3, lambda d: torch.randn(2, 3, 4, device=d),
                       r"expected 4D input \(got 3D input\)"),
    "4d-input-to-1d": (nn.BatchNorm1d, fusedbn.FusedBatchNorm1d, 3, lambda d: torch.randn(2, 3, 4, 4, device=d),
                       r"expected 2D or 3D input \(got 4D input\)"),
    "4d-input-to-3d": (nn.BatchNorm3d, fusedbn.FusedBatchNorm3d, 3, lambda d: torch.randn(2, 3, 4, 4, device=d),
                       r"expected 5D input \(got 4D input\)"),
    "channel-mismatch": (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d, 3, lambda d: torch.randn(2, 4, 4, 4, device=d),
                         r"should contain 4 elements not 3"),
    "one-value-per-channel": (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d, 3, lambda d: torch.randn(1, 3, 1, 1, device=d),
                              r"Expected more than 1 value per channel when training"),
    "integer-input": (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d, 3,
                      lambda d: torch.ones(2, 3, 4, 4, dtype=torch.int64, device=d), r"not implemented for 'Long'"),
    "bool-input": (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d, 3,
                   lambda d: torch.ones(2, 3, 4, 4, dtype=torch.bool, device=d), r"not implemented for 'Bool'"),
}


@pytest.mark.parametrize("case", CASES)
def test_rejected_like_torch(device, case):
    torch_cls, fused_cls, channels, make_x, message = CASES[case]
    torch_module = torch_cls(channels, device=device)
    fused_module = fused_cls(channels, device=device)
    theirs, ours = _raise_like_torch(torch_module, fused_module, lambda: make_x(device))
    if device == "cpu":  # torch's CUDA path words some of these through cuDNN; ours keeps one wording
        assert re.search(message, theirs), theirs
    assert re.search(message, ours), ours


@pytest.mark.parametrize("param", ["weight", "bias", "running_mean", "running_var"])
def test_parameter_of_unsupported_dtype(device, param):
    fused_module = fusedbn.FusedBatchNorm2d(3, device=device)
    # float64 parameters with float32 input: nn.BatchNorm rejects the mix on the CPU as well.
    getattr(fused_module, param).data = getattr(fused_module, param).data.to(torch.float64)
    before = {k: v.clone() for k, v in fused_module.state_dict().items()}
    with pytest.raises(RuntimeError, match="mixed dtype"):
        fused_module(torch.randn(2, 3, 4, 4, device=device))
    assert all(torch.equal(before[k], v) for k, v in fused_module.state_dict().items())


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


def test_functional_rejects_wrong_param_size(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    for kwargs, name in ((dict(weight=torch.ones(4, device=device)), "weight"),
                         (dict(bias=torch.ones(4, device=device)), "bias")):
        with pytest.raises(RuntimeError, match=f"{name} should contain 3 elements not 4"):
            fusedbn.batch_norm(x, None, None, training=True, **kwargs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch_behaves_as_torch(device, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ref, ours = nn.BatchNorm2d(3, device=device), fusedbn.FusedBatchNorm2d(3, device=device)
    outputs = []
    for module in (ref, ours):
        x = torch.randn(0, 3, 4, 4, device=device).to(memory_format=fmt).requires_grad_(True)
        y = module(x)
        y.sum().backward()
        outputs.append((y, x.grad, module.weight.grad, module.bias.grad))
    for theirs, mine in zip(*outputs):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    for name, buffer in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], buffer), name
