"""fold_conv_bn, FrozenBatchNorm2d and freeze against the unfolded / unfrozen torch model."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fusedbn
from helpers import assert_close, randomize_batch_norms, torchvision_models


@pytest.mark.parametrize("name,count", [("resnet18", 20), ("resnet50", 53)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_conv_bn_on_resnets(name, count, dtype):
    """Every BatchNorm of an eval-mode ResNet folds; outputs match within the dtype's tolerance (the folding
    itself is done in float64, so a bfloat16 model loses no more than its own rounding)."""
    torch.manual_seed(0)
    model = randomize_batch_norms(getattr(torchvision_models(), name)(weights=None)).eval().to(dtype)
    report = fusedbn.Report()
    folded = fusedbn.fold_conv_bn(model, report=report)
    assert report.count("folded") == count, str(report)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        expected = model.double()(x.double())
        theirs = model.to(dtype)(x)
        ours = folded(x)
    # Our error against float64 stays within a few times the unfolded model's own.
    assert (ours.double() - expected).abs().max() <= 4 * (theirs.double() - expected).abs().max() + 1e-5


def test_fold_leaves_training_and_shared_layers_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_train, self.bn_train = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.conv_shared, self.bn_after_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.linear, self.bn1d = nn.Linear(4, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            y = self.bn_train(self.conv_train(x))
            z = self.conv_shared(y)
            y = self.bn_after_shared(z) + z  # the conv's output has another user: not foldable
            return self.bn1d(self.linear(y.mean(dim=(2, 3))))

    net = randomize_batch_norms(Net()).eval()
    net.bn_train.train()
    x = torch.randn(2, 3, 6, 6)
    report = fusedbn.Report()
    folded = fusedbn.fold_conv_bn(net, example_inputs=(x,), report=report)
    assert _folded(report) == [("linear", "bn1d")]
    # The shape propagation ran in eval mode: the training BatchNorm is still training, its statistics unmoved.
    assert folded.bn_train.training
    torch.testing.assert_close(folded.bn_train.running_mean, net.bn_train.running_mean, rtol=0, atol=0)
    net.bn_train.eval()
    folded.bn_train.eval()
    with torch.no_grad():
        assert_close(folded(x), net(x), torch.float32)


def _folded(report):
    """The (layer, BatchNorm) pairs ``fold_conv_bn`` folded."""
    return [(layer, bn) for _, bn, layer in report.done]


BATCH_NORM_1D = [pytest.param(nn.BatchNorm1d, id="torch"), pytest.param(fusedbn.FusedBatchNorm1d, id="fusedbn")]


def _fold_and_compare(model, x, **kwargs):
    """fold_conv_bn(model, **kwargs), its report, and its output on ``x`` checked against ``model``'s."""
    report = fusedbn.Report()
    folded = fusedbn.fold_conv_bn(model, **kwargs, report=report)
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32, str(report))
    return folded, report


@pytest.mark.parametrize("bn_class", BATCH_NORM_1D)
def test_fold_keeps_linear_bn1d_on_3d_input(bn_class):
    """On (N, L, F) the Linear's features are the last dim while BatchNorm1d normalizes dim 1 (L): not folded."""
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(nn.Linear(5, 5), bn_class(5))).eval()
    x = torch.randn(4, 5, 5)
    folded, report = _fold_and_compare(model, x, example_inputs=(x,))
    assert _folded(report) == []
    assert [bn for bn, _ in report.skipped] == ["1"]
    assert "not folded into 0" in report.skipped[0][1] and "(4, 5, 5)" in report.skipped[0][1]
    assert "left alone: 1" in str(report)
    assert isinstance(folded.get_submodule("1"), bn_class)


@pytest.mark.parametrize("bn_class", BATCH_NORM_1D)
def test_fold_linear_bn1d_on_2d_input(bn_class):
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(nn.Linear(6, 5), bn_class(5), nn.ReLU())).eval()
    x = torch.randn(4, 6)
    folded, report = _fold_and_compare(model, x, example_inputs=x)  # one tensor, not a tuple
    assert _folded(report) == [("0", "1")] and report.skipped == []
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())


@pytest.mark.parametrize("bn_class", BATCH_NORM_1D)
def test_fold_conv1d_bn1d_batched_only(bn_class):
    """Conv1d on (N, C, L) folds; on unbatched (C, L) its 2-D output makes BatchNorm1d normalize over L."""
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), bn_class(4))).eval()
    batched = torch.randn(2, 3, 7)
    folded, report = _fold_and_compare(model, batched, example_inputs=(batched,))
    assert _folded(report) == [("0", "1")] and report.skipped == []
    unbatched = torch.randn(3, 4)
    folded, report = _fold_and_compare(model, unbatched, example_inputs=(unbatched,))
    assert _folded(report) == [] and [bn for bn, _ in report.skipped] == ["1"]


@pytest.mark.parametrize("bn_class", BATCH_NORM_1D)
def test_fold_without_example_inputs_skips_bn1d(bn_class):
    """Without example inputs only Conv2d/3d -> BatchNorm2d/3d are provably equivalent (those BatchNorms take
    only batched input); Linear/Conv1d -> BatchNorm1d are skipped with the reason in the report."""
    bn2d_class = nn.BatchNorm2d if bn_class is nn.BatchNorm1d else fusedbn.FusedBatchNorm2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d, self.bn2d = nn.Conv2d(3, 4, 3), bn2d_class(4)
            self.conv1d, self.bn_conv1d = nn.Conv1d(4, 4, 1), bn_class(4)
            self.linear, self.bn_linear = nn.Linear(4, 4), bn_class(4)

        def forward(self, x):
            y = self.bn_conv1d(self.conv1d(self.bn2d(self.conv2d(x)).flatten(2)))
            return self.bn_linear(self.linear(y.mean(dim=2)))

    torch.manual_seed(0)
    net = randomize_batch_norms(Net()).eval()
    folded, report = _fold_and_compare(net, torch.randn(2, 3, 6, 6))
    assert _folded(report) == [("conv2d", "bn2d")]
    assert [bn for bn, _ in report.skipped] == ["bn_conv1d", "bn_linear"]
    assert all("example_inputs" in reason for _, reason in report.skipped)
    assert "pass example_inputs to fold Linear -> BatchNorm1d" in str(report)


def test_fold_keeps_the_relu_of_a_fused_batch_norm():
    """A FusedBatchNormReLU2d folds into the conv before it and leaves its relu (and residual) behind."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), fusedbn.FusedBatchNormReLU2d(3)
            self.conv_add, self.bn_add = nn.Conv2d(3, 3, 1), fusedbn.FusedBatchNormReLU2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.bn_add(self.conv_add(y), x)

    model = randomize_batch_norms(Block()).eval()
    folded, report = _fold_and_compare(model, torch.randn(2, 3, 5, 5))
    assert _folded(report) == [("conv", "bn"), ("conv_add", "bn_add")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_fold_warns_when_fx_cannot_trace():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fusedbn.Report()
        fusedbn.fold_conv_bn(Dynamic().eval(), report=report)
    assert "cannot trace" in report.skipped[0][1] and any("cannot trace" in str(w.message) for w in caught)


def test_frozen_batch_norm_loads_a_batch_norm_state_dict(device):
    bn = randomize_batch_norms(nn.BatchNorm2d(6)).to(device).eval()
    frozen = fusedbn.FrozenBatchNorm2d(6).to(device)
    frozen.load_state_dict(bn.state_dict())
    assert not list(frozen.parameters())
    x = torch.randn(3, 6, 5, 4, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = frozen(x), bn(x_ref)
    assert_close(y, y_ref, torch.float32)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x.grad, x_ref.grad, torch.float32)


def test_freeze_converts_in_place():
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision_models().resnet18(weights=None)).eval()
    reference = copy.deepcopy(model)
    report = fusedbn.Report()
    assert fusedbn.freeze(model, report=report) is model
    assert report.count("frozen") == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, fusedbn.FrozenBatchNorm2d) for m in model.modules()) == 20
    x = torch.randn(2, 3, 64, 64)
    model.train()  # frozen statistics do not move in training mode either
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
