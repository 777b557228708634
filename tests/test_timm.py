"""timm's models, whose BatchNorm layers are timm's BatchNormAct2d (BatchNorm, drop, activation in one
nn.BatchNorm2d subclass): convert_model and fuse_model against the unconverted model in float64, over SGD
steps (drop path and dropout on, the RNG reseeded for both) and in eval; freeze and revert_model."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fusedbn
from helpers import assert_same_state

timm = pytest.importorskip("timm")
from timm.layers.norm_act import BatchNormAct2d  # noqa: E402

pytestmark = pytest.mark.slow  # whole models

# model, the BatchNorm layers fusedbn runs, and how many of them are timm's BatchNormAct2d.
MODELS = [("efficientnet_b0", 49, 49), ("mobilenetv3_large_100", 46, 46), ("regnety_002", 44, 44),
          ("resnet18", 20, 0)]


def _steps(model, x, steps=2):
    """Outputs of `steps` SGD steps on mean(output^2), then the eval output; the RNG reseeded per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    for step in range(steps):
        torch.manual_seed(step)
        y = model(x)
        outputs.append(y.detach())
        y.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    outputs.append(model(x).detach())
    return outputs


@pytest.mark.parametrize("transform", ["convert_model", "fuse_model"])
@pytest.mark.parametrize("name,batch_norms,norm_acts", MODELS)
def test_timm_models_compute_what_they_computed(name, batch_norms, norm_acts, transform):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.1, drop_rate=0.1).double()
    ours = copy.deepcopy(model)
    report = fusedbn.Report()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left alone silently or with a warning here
        assert getattr(fusedbn, transform)(ours, report=report) is ours
    kinds = [type(m) for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(k.__module__.startswith("fusedbn.") for k in kinds) and len(kinds) == batch_norms, str(report)
    assert sum(isinstance(m, BatchNormAct2d) for m in ours.modules()) == norm_acts
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for mine, theirs in zip(_steps(ours, x), _steps(model, x)):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
    assert_same_state(ours, model, rtol=1e-9, atol=1e-9)


def test_norm_act_reverts_and_freeze_leaves_it_alone():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_large_100", pretrained=False).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"BatchNormAct2d has no frozen twin"):
        fusedbn.freeze(copy.deepcopy(model))  # timm's class: left alone, loudly, activation kept
    fusedbn.convert_model(model)
    report = fusedbn.Report()
    with pytest.warns(UserWarning, match=r"FusedTimmBatchNormAct2d has no frozen twin"):
        fusedbn.freeze(model, report=report)
    assert report.count("frozen") == 0 and len(report.skipped) == 46
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    fusedbn.revert_model(model)
    assert sum(type(m) is BatchNormAct2d for m in model.modules()) == 46
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_an_unknown_batch_norm_subclass_is_left_alone_with_a_warning():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(3))
    report = fusedbn.Report()
    with pytest.warns(UserWarning, match=r"fusedbn.convert_model: 0 left alone: .*Scaled has a forward of its own"):
        fusedbn.convert_model(model, report=report)
    assert type(model[0]) is Scaled and report.skipped[0][0] == "0"


def test_fold_conv_bn_leaves_norm_act_layers_alone():
    """fold_conv_bn would drop a BatchNormAct2d's drop and act layers with the BatchNorm: it folds none of
    them (timm's class or fusedbn's twin), says so in the report, and the copy computes what the model does."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_large_100", pretrained=False).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for convert in (False, True):
        if convert:
            fusedbn.convert_model(model)
        report = fusedbn.Report()
        folded = fusedbn.fold_conv_bn(model, report=report)
        assert report.count("folded") == 0 and len(report.skipped) == 46
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_norm_act_with_a_hooked_act_runs_the_hook(kind):
    """An activation with hooks of its own stays its own call after convert_model, as in timm's module, so
    its hook sees what it saw before (the fused op would skip it)."""
    layer = BatchNormAct2d(4, act_layer=nn.SiLU)
    layer.act = nn.SiLU()  # not in place: a full backward hook refuses in-place modules
    seen = []
    if kind == "forward":
        layer.act.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    else:
        layer.act.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].detach()))
    model = nn.Sequential(layer)
    reference = copy.deepcopy(model)
    fusedbn.convert_model(model)
    assert type(model[0]) is not BatchNormAct2d
    x = torch.randn(2, 4, 3, 3)
    for m in (reference, model):
        m(x.clone().requires_grad_()).sum().backward()
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0])
