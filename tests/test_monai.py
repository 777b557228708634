"""MONAI's networks with BatchNorm (``norm="batch"``): their ``ADN`` blocks put a Dropout of probability 0
between the BatchNorm and the activation (ReLU, or MONAI's default PReLU), which fuse_model passes through.
Against the unfused model in float64 over SGD steps and in eval."""
import copy

import pytest
import torch

import fusedbn
from helpers import assert_same_state

nets = pytest.importorskip("monai.networks.nets", reason="the MONAI tests need monai: pip install .[test]")

pytestmark = pytest.mark.slow  # whole models


def _fuses_every_batch_norm_and_computes_the_same(model, activation, count):
    """``count`` BatchNorm+``activation`` pairs fused, no BatchNorm left unfused; the same parameters and
    statistics as the unfused model after two SGD steps, and the same eval output (float64)."""
    reference = copy.deepcopy(model)
    report = fusedbn.Report()
    fusedbn.fuse_model(model, report=report)
    assert report.count("fused", activation) == count and report.count("converted") == 0, str(report)
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_same_state(model, reference, rtol=1e-9, atol=1e-9)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)


def test_unet_with_relu_fuses_every_batch_norm():
    torch.manual_seed(0)
    model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                      num_res_units=2, norm="batch", act="relu").double()
    _fuses_every_batch_norm_and_computes_the_same(model, "relu", 9)


def test_unet_with_its_default_prelu_fuses_every_batch_norm():
    """MONAI's default activation, PReLU (one weight each): its weights stay the nn.PReLU's parameters, which
    the SGD steps move (13 of 13 BatchNorms fused; none before PReLU was a fused activation)."""
    torch.manual_seed(0)
    model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                      num_res_units=2, norm="batch").double()
    assert sum(isinstance(m, torch.nn.PReLU) for m in model.modules()) == 13
    _fuses_every_batch_norm_and_computes_the_same(model, "prelu", 13)
