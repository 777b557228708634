"""Every fusedbn model transform applied after every other (and after itself), on a ResNet-18 with all three
kinds of fusedbn module (BatchNorm, BatchNorm+ReLU, BatchNorm+Add+ReLU) and on a network with every other
activation fuse_model fuses (modules, functions, a method, a PReLU with its weight; with and without a
residual): each accepts the other's output, returns the model, and the result computes what torch's model
computes (float64, eval; and a training step where neither transform freezes or folds, nor needs a process
group). torch's own
SyncBatchNorm converter is among them: the code fuse_model rewrote still applies the activation of a
BatchNorm it replaced."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedbn
from helpers import randomize_batch_norms, torchvision_models

TRANSFORMS = {
    "convert_model": fusedbn.convert_model,
    "fuse_model": fusedbn.fuse_model,
    "fold_conv_bn": lambda model: fusedbn.fold_conv_bn(model.eval()),
    "freeze": fusedbn.freeze,
    "revert_model": fusedbn.revert_model,
    "convert_sync_batchnorm": fusedbn.convert_sync_batchnorm,
    "torch's convert_sync_batchnorm": nn.SyncBatchNorm.convert_sync_batchnorm,
}
CHANGES_TRAINING = {"fold_conv_bn", "freeze"}  # eval-only results by design


def _resnet18():
    torch.manual_seed(0)
    return randomize_batch_norms(torchvision_models().resnet18(weights=None).double())


class ActivationsNet(nn.Module):
    """conv -> BatchNorm -> each activation fuse_model fuses, as a module, a function or a method, and
    BatchNorm -> add -> activation."""

    def __init__(self, c=6):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else c, c, 3, padding=1) for i in range(10))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(10))
        self.silu, self.relu6, self.leaky, self.gelu = nn.SiLU(inplace=True), nn.Hardtanh(0.0, 6.0), nn.LeakyReLU(0.2), nn.GELU("tanh")
        self.prelu = nn.PReLU(c)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.linspace(-0.5, 0.8, c))

    def forward(self, x):
        conv, bn = self.convs, self.bns
        x = self.silu(bn[0](conv[0](x)))
        x = self.relu6(bn[1](conv[1](x)))
        x = self.leaky(bn[2](conv[2](x)))
        x = self.gelu(bn[3](conv[3](x)))
        x = F.elu(bn[4](conv[4](x)), alpha=0.5)
        x = F.hardswish(bn[5](conv[5](x)) + x)  # with a residual
        x = F.gelu(bn[6](conv[6](x)) + x)
        x = bn[7](conv[7](x)).relu()
        x = self.prelu(bn[9](conv[9](x)) + x)  # a weight of its own, passed to the fused call
        return F.silu(x + bn[8](conv[8](x)))  # the residual first


# Exact GELU and ELU stay torch's (activations.AUTO_FUSED).
FUSED_IN_ACTIVATIONS_NET = {"silu": 1, "relu6": 1, "leaky_relu": 1, "gelu_tanh": 1, "add+hardswish": 1, "relu": 1,
                            "add+prelu": 1, "add+silu": 1}


def _activations_net():
    """ActivationsNet inside a Sequential: fuse_model rewrites the forward of a model's submodules, never of
    the model itself."""
    torch.manual_seed(0)
    return randomize_batch_norms(nn.Sequential(ActivationsNet()).double())


MODELS = {"resnet18": (_resnet18, 32), "activations": (_activations_net, 8)}


def test_fuse_model_fuses_every_activation():
    model = _activations_net()
    report = fusedbn.Report()
    fusedbn.fuse_model(model, report=report)
    fused = {}
    for _, name, detail in report.done:
        if _ == "fused":
            fused[detail] = fused.get(detail, 0) + 1
    assert fused == FUSED_IN_ACTIVATIONS_NET, str(report)
    assert {type(bn).__name__ for bn in model[0].bns} == {"FusedBatchNormAct2d", "FusedBatchNormReLU2d", "FusedBatchNorm2d"}
    unfused = fusedbn.Report()
    fusedbn.fuse_model(ActivationsNet(), report=unfused)
    assert unfused.count("fused") == 0 and "the model's own forward is not rewritten" in str(unfused)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("second", TRANSFORMS)
@pytest.mark.parametrize("first", TRANSFORMS)
def test_transforms_compose(first, second, model_name):
    build, size = MODELS[model_name]
    model = build()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    ours = TRANSFORMS[second](TRANSFORMS[first](copy.deepcopy(model)))
    if not CHANGES_TRAINING & {first, second} and not any("sync" in t for t in (first, second)):
        ours.train()
        model.train()
        torch.testing.assert_close(ours(x), model(x), rtol=1e-9, atol=1e-9)
    ours.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-9, atol=1e-9)


def test_convert_sync_batchnorm_refuses_what_it_would_change():
    bn_relu = fusedbn.FusedBatchNormReLU2d(3)  # built by hand: its own forward applies the relu
    with pytest.raises(NotImplementedError, match=r"0 is a FusedBatchNormReLU2d, which computes more"):
        fusedbn.convert_sync_batchnorm(nn.Sequential(bn_relu))
