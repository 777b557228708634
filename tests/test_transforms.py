"""Every fusedbn model transform applied after every other (and after itself), on a ResNet-18 with all three
kinds of fusedbn module (BatchNorm, BatchNorm+ReLU, BatchNorm+Add+ReLU): each accepts the other's output,
returns the model, and the result computes what torch's model computes (float64, eval; and a training step
where neither transform freezes or folds, nor needs a process group). torch's own SyncBatchNorm converter is
among them: the code fuse_model rewrote still applies the relu of a BatchNorm it replaced."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fusedbn

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
    model = torchvision.models.resnet18(weights=None).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


@pytest.mark.parametrize("second", TRANSFORMS)
@pytest.mark.parametrize("first", TRANSFORMS)
def test_transforms_compose(first, second):
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
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
