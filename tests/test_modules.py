"""FusedBatchNorm*d behave as nn.BatchNorm*d in everything but speed; convert_model swaps them in place."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fusedbn
from helpers import BATCH_NORMS, assert_close

PAIRS = list(BATCH_NORMS.values())
CONSTRUCTOR_ARGS = [
    dict(),
    dict(eps=1e-3, momentum=0.3),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(dtype=torch.float64),
]


@pytest.mark.parametrize("torch_cls,fused_cls", PAIRS, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
def test_same_module_surface(device, torch_cls, fused_cls, kwargs):
    ref, ours = torch_cls(5, device=device, **kwargs), fused_cls(5, device=device, **kwargs)
    assert isinstance(ours, torch_cls) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), name
    ours.load_state_dict(ref.state_dict())
    ours.reset_parameters()
    ref.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert ours.eval() is ours and not ours.training and ours.train().training


def test_deepcopy_and_pickle_keep_state():
    module = fusedbn.FusedBatchNorm2d(4, momentum=None)
    module(torch.randn(3, 4, 5, 5))
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert type(clone) is fusedbn.FusedBatchNorm2d and clone.momentum is None
        for (name, a), b in zip(module.state_dict().items(), clone.state_dict().values()):
            assert torch.equal(a, b), name
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    restored = nn.BatchNorm2d(4, momentum=None)
    restored.load_state_dict(torch.load(buffer))  # our checkpoints load into torch's module and back


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _batch_norm(cls, device):
    m = cls(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        m._parameters["weight"].copy_(torch.tensor([0.5, 1.0, 1.5]))  # not m.weight: a product in one case below
    return m


def _parametrized(cls, device):
    m = _batch_norm(cls, device)
    nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())
    return m


def _bias_attribute(cls, device):
    m = _batch_norm(cls, device)
    del m.bias
    m.bias = torch.full((3,), 0.5, dtype=torch.float64, device=device)  # a plain attribute now, not a parameter
    return m


def _own_getattr(cls, device):
    class TripledWeight(cls):
        def __getattr__(self, name):
            value = super().__getattr__(name)
            return 3 * value if name == "weight" else value
    return _batch_norm(TripledWeight, device)


STATE_CHANGES = {"parametrized": _parametrized, "bias attribute": _bias_attribute, "own __getattr__": _own_getattr}


@pytest.mark.parametrize("change", STATE_CHANGES)
def test_state_is_what_attribute_lookup_returns(device, change):
    """The modules read their parameters and buffers from the module's dicts (fusedbn/modules.py, batch_norm_state)
    only where ``module.<name>`` would: a parametrization, a plain attribute in a parameter's place or a class
    with a lookup of its own change what they compute as they change torch's module."""
    ref, ours = (STATE_CHANGES[change](cls, device) for cls in (nn.BatchNorm2d, fusedbn.FusedBatchNorm2d))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    for training in (True, False):
        expected, actual = (m.train(training)(x) for m in (ref, ours))
        torch.testing.assert_close(actual, expected)
        for name, a in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], a, msg=name)
        (expected_grad,), (actual_grad,) = (torch.autograd.grad(y.sum(), x) for y in (expected, actual))
        torch.testing.assert_close(actual_grad, expected_grad)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.BatchNorm1d(32), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _resnet18():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is installed by `make test`")
    return torchvision.models.resnet18(weights=None, num_classes=10)


MODELS = {"small-cnn": (SmallNet, (8, 3, 16, 16)), "resnet18": (_resnet18, (4, 3, 64, 64))}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_convert_model_trains_identically(model_name, layout):
    """A converted model and the original give the same forward/backward, state_dict keys and parameters
    over several SGD steps, then the same eval output (float64 so that the comparison is exact enough)."""
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    original = factory().double()
    converted = copy.deepcopy(original)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    original, converted = original.to(memory_format=fmt), converted.to(memory_format=fmt)
    keys = list(converted.state_dict())
    params_before = list(converted.parameters())
    assert fusedbn.convert_model(converted) is converted
    assert list(converted.state_dict()) == keys
    assert all(a is b for a, b in zip(converted.parameters(), params_before)), "parameters must be kept"
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m).__name__.startswith("Fused") for m in bns)

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (original, converted)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(memory_format=fmt)
        target = torch.randint(0, 10, (shape[0],), generator=gen)
        losses = []
        for model, opt in zip((original, converted), optimizers):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss)
            opt.step()
        assert_close(losses[1], losses[0], torch.float64)
        for (name, a), b in zip(original.state_dict().items(), converted.state_dict().values()):
            if a.is_floating_point():
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)
            else:
                assert torch.equal(a, b), name
    original.eval()
    converted.eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-9, atol=1e-9)


def test_convert_model_keeps_training_flag_dtype_and_device():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm3d(2, dtype=torch.float64))).eval()
    fusedbn.convert_model(model)
    assert type(model[0]) is fusedbn.FusedBatchNorm1d and type(model[1][0]) is fusedbn.FusedBatchNorm3d
    assert not model[0].training and model[1][0].weight.dtype == torch.float64
    root = fusedbn.convert_model(nn.BatchNorm2d(3))
    assert type(root) is fusedbn.FusedBatchNorm2d
    sync = nn.SyncBatchNorm(3)
    assert type(fusedbn.convert_model(sync)) is nn.SyncBatchNorm  # subclasses are left alone
