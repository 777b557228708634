"""Fused BatchNorm+activation and BatchNorm+Add+activation against torch's unfused composition, for every
activation: outputs, every gradient (the residual's too) and running statistics, relu's ties at zero, what
stays alive for backward, and fuse_model on torchvision's models."""
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import fusedbn
from helpers import (BATCH_NORMS, Trio, assert_as_accurate, assert_close, assert_same_state, make_input,
                     over_dtype_pairs, torchvision_models)

FUSED = {1: fusedbn.FusedBatchNormAct1d, 2: fusedbn.FusedBatchNormAct2d, 3: fusedbn.FusedBatchNormAct3d}
SHAPES = [(1, (5, 3)), (2, (4, 6, 9, 11)), (2, (3, 16, 5, 5)), (3, (2, 3, 3, 4, 5)), (2, (2, 3, 24, 24))]
# Every activation, with a parameter other than torch's default where it takes one.
ACTIVATIONS = [("relu", None), ("identity", None), ("relu6", None), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", None),
               ("hardswish", None), ("gelu", None), ("gelu_tanh", None), ("prelu", None)]
TORCH_ACTIVATION = {"identity": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "leaky_relu": nn.LeakyReLU(0.1),
                    "elu": nn.ELU(0.7), "silu": nn.SiLU(), "hardswish": nn.Hardswish(), "gelu": nn.GELU(),
                    "gelu_tanh": nn.GELU(approximate="tanh")}  # nn.PReLU holds a weight: one per trio (_trio)
# Where act' jumps.
KINKS = {"relu": (0,), "relu6": (0, 6), "leaky_relu": (0,), "elu": (0,), "hardswish": (-3, 3), "prelu": (0,)}


class TorchBNAct(nn.Module):
    """The unfused composition fusedbn replaces: act(bn(x) + residual)."""

    def __init__(self, bn, activation="relu", act=None):
        super().__init__()
        if act is None:
            act = nn.PReLU() if activation == "prelu" else TORCH_ACTIVATION[activation]
        self.bn, self.act = bn, act

    def forward(self, x, residual=None):
        y = self.bn(x)
        z = y if residual is None else y + residual
        self.bn_output, self.pre_activation = y.detach(), z.detach()
        self.terms = (y.abs() + (0 if residual is None else residual.abs())).detach()
        return self.act(z)


def _trio(dims, channels, dtype, param_dtype, device, activation=("relu", None)):
    ref = BATCH_NORMS[dims][0](channels, device=device, dtype=param_dtype)
    gen = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        ref.bias.copy_(torch.rand(channels, generator=gen) - 0.5)
    ours = FUSED[dims](channels, device=device, dtype=param_dtype, activation=activation[0],
                       activation_param=activation[1])
    exact = copy.deepcopy(ref).double()
    if activation[0] != "prelu":
        ours.load_state_dict(ref.state_dict())
        return Trio(TorchBNAct(ref, activation[0]), ours, TorchBNAct(exact, activation[0]), norms=(ref, ours, exact))
    # PReLU: torch's weight in the input's dtype (F.prelu promotes none), ours in the parameters'; slopes in
    # [0, 0.5) that every dtype holds exactly, so the three compute with the same weight.
    prelu = nn.PReLU(channels, device=device, dtype=dtype)
    with torch.no_grad():
        prelu.weight.copy_(torch.randint(0, 32, (channels,), generator=gen) / 64)
    ours.load_state_dict({**ref.state_dict(), "activation_weight": prelu.weight})
    return Trio(TorchBNAct(ref, "prelu", prelu), ours, TorchBNAct(exact, "prelu", copy.deepcopy(prelu).double()),
                norms=(ref, ours, exact))


def _check_prelu_weight_grads(trio, dtype, label):
    """PReLU's weight gradient, sum(dy * min(z, 0)) per channel, as accurate as torch's (``ours`` in its own
    parameter dtype, compared in the input's); zeroed for the next step."""
    theirs, mine, exact = trio.modules[0].act.weight, trio.modules[1].activation_weight, trio.modules[2].act.weight
    count = trio.modules[2].pre_activation.numel() // theirs.numel()
    assert_as_accurate(mine.grad.to(dtype), theirs.grad, exact.grad, dtype, f"{label}: grad_activation_weight",
                       scale=math.sqrt(count))
    for weight in (theirs, mine, exact):
        weight.grad = None


@pytest.mark.parametrize("dims,shape", SHAPES, ids=[f"{d}d-{'x'.join(map(str, s))}" for d, s in SHAPES])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@over_dtype_pairs
@pytest.mark.parametrize("with_residual", [False, True], ids=["bn-act", "bn-add-act"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_fused_matches_unfused_torch(device, dims, shape, layout, dtype, param_dtype, with_residual, activation):
    trio = _trio(dims, shape[1], dtype, param_dtype, device, activation)
    exact = trio.modules[2]
    gen = torch.Generator().manual_seed(0)
    for step, training in enumerate([True, True, False]):
        trio.train(training)
        x = make_input(shape, layout, dtype, device, mean=step - 1.0, std=1.0 + step, generator=gen)
        # The residual in the other layout: the kernels must bring it to the input's.
        r = make_input(shape, "contiguous" if layout == "channels_last" else "channels_last", dtype, device,
                       generator=gen) if with_residual else None
        grad = make_input(shape, "contiguous", dtype, device, generator=gen)
        results = trio.run((x, r), grad)
        # act' jumps at its kinks (relu's 0): where the exact pre-activation is within the dtype's rounding
        # of one (eval also rounds the running statistics to the parameters' dtype), either side of the
        # jump is right, for torch and for us alike.
        ambiguous = torch.zeros_like(exact.pre_activation, dtype=torch.bool)
        for kink in KINKS.get(activation[0], ()):
            ambiguous |= (exact.pre_activation - kink).abs() <= 8 * torch.finfo(dtype).eps * (exact.terms + 1 + abs(kink))
        # What the ambiguous values may add to a channel's sum: the jump (at most 1.5) times |dy| (bias),
        # |dy * x_hat| (weight).
        channel_dims = [d for d in range(x.dim()) if d != 1]
        shape_c = [-1 if d == 1 else 1 for d in range(x.dim())]
        x_hat = (exact.bn_output - exact.bn.bias.view(shape_c)) / exact.bn.weight.view(shape_c)
        ambiguous_dy = torch.where(ambiguous, 1.5 * grad.double().abs(), 0)
        slack = {"grad_bias": ambiguous_dy.sum(channel_dims).max().item(),
                 "grad_weight": (ambiguous_dy * x_hat.abs()).sum(channel_dims).max().item()}
        label = f"step {step} ({'train' if training else 'eval'})"
        if activation[0] == "prelu":  # before trio.check zeroes our module's gradients
            _check_prelu_weight_grads(trio, dtype, label)
        trio.check(results, label, slack=slack, either_side=ambiguous)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_ties_at_zero_get_no_gradient(device, layout, training):
    """Where relu's input is exactly zero, torch's relu passes no gradient; neither may ours. Each channel
    holds -1, 0 and 1 (mean exactly 0) and the bias is 0, so bn(x) is exactly 0 at every 0; with the
    residual, weight 0 and residual = -bias make every value a tie."""
    shape = (2, 3, 3, 4)
    x = torch.tensor([-1.0, 0.0, 1.0]).repeat(shape[0] * shape[2] * shape[3] // 3 * shape[1]).reshape(
        shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    x = make_input(shape, layout, torch.float32, device) * 0 + x.to(device)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    for with_residual in (False, True):
        ref = nn.BatchNorm2d(3, device=device).train(training)
        with torch.no_grad():
            ref.running_mean.zero_()
            ref.running_var.fill_(1.0)
            ref.bias.copy_(torch.tensor([0.5, -0.25, 2.0]) if with_residual else torch.zeros(3))
            if with_residual:
                ref.weight.zero_()
        ours = fusedbn.FusedBatchNormReLU2d(3, device=device).train(training)
        ours.load_state_dict(ref.state_dict())
        r = (-ref.bias.detach()).view(1, 3, 1, 1).expand(shape).contiguous() if with_residual else None
        (y_ref, gx_ref, gr_ref), (y_ours, gx_ours, gr_ours), _ = Trio(TorchBNAct(ref), ours).run((x, r), grad)
        assert torch.equal(y_ours, y_ref)
        assert (y_ours == 0).any()
        assert_close(gx_ours, gx_ref, torch.float32)
        assert_close(ours.bias.grad, ref.bias.grad, torch.float32)
        assert_close(ours.weight.grad, ref.weight.grad, torch.float32)
        if with_residual:
            assert torch.equal(gr_ours, gr_ref)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn's graph is alive."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("with_residual", [False, True], ids=["bn-relu", "bn-add-relu"])
def test_saved_activations(with_residual):
    """BN+ReLU keeps only its input for backward (torch's composition keeps the input and relu's output);
    BN+Add+ReLU keeps the input and its output, which the next layer (a convolution) keeps anyway."""
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    r = torch.randn(8, 16, 32, 32, requires_grad=True) if with_residual else None
    activation = x.numel() * x.element_size()
    ref, ours = TorchBNAct(nn.BatchNorm2d(16)), fusedbn.FusedBatchNormReLU2d(16)
    theirs, _ = _saved_bytes(lambda: ref(x, r))
    mine, out = _saved_bytes(lambda: ours(x, r))
    assert theirs >= activation * 2  # the input, relu's output (and whatever torch's BatchNorm adds)
    assert activation * (2 if with_residual else 1) <= mine < activation * (2 if with_residual else 1) + 4096
    # Followed by a convolution, which saves its input (our output): the two stay at two activations.
    conv = nn.Conv2d(16, 16, 1)
    theirs_net, _ = _saved_bytes(lambda: conv(ref(x, r)))
    mine_net, _ = _saved_bytes(lambda: conv(ours(x, r)))
    assert mine_net < activation * 2.1 and mine_net <= theirs_net


@pytest.mark.parametrize("activation", ACTIVATIONS[1:], ids=[a for a, _ in ACTIVATIONS[1:]])
def test_saved_activations_of_every_activation(activation):
    """BN+act keeps only its input for backward, where torch's composition keeps the input and the
    activation's input (identity: torch keeps the input alone too). With a residual, BN+add+act keeps the
    input and the residual; in a residual block (out = act(bn(conv(h)) + h)) the residual h is the
    convolution's input, which the convolution keeps anyway: two activations alive, torch's three."""
    h = torch.randn(8, 16, 32, 32, requires_grad=True)
    size = h.numel() * h.element_size()
    conv = nn.Conv2d(16, 16, 1)
    ref = TorchBNAct(nn.BatchNorm2d(16), activation[0])
    ours = fusedbn.FusedBatchNormAct2d(16, activation=activation[0], activation_param=activation[1])
    x = conv(h).detach().requires_grad_()
    theirs, _ = _saved_bytes(lambda: ref(x))
    mine, _ = _saved_bytes(lambda: ours(x))
    assert size <= mine < size + 4096
    assert theirs >= size * (1 if activation[0] == "identity" else 2)
    theirs_block, _ = _saved_bytes(lambda: ref(conv(h), h))
    mine_block, _ = _saved_bytes(lambda: ours(conv(h), h))
    assert 2 * size <= mine_block < 2 * size + 8192
    assert theirs_block >= size * (2 if activation[0] == "identity" else 3)


def test_residual_that_broadcasts_is_added_unfused(device):
    """A residual of another shape or dtype (as `+` allows) still gives torch's result."""
    x = torch.randn(2, 3, 4, 5, device=device)
    for r in (torch.randn(3, 1, 1, device=device), torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64)):
        ref, ours = nn.BatchNorm2d(3, device=device), fusedbn.FusedBatchNormReLU2d(3, device=device)
        expected = torch.relu(ref(x) + r)
        assert_close(ours(x, r), expected, torch.float32)


def test_functional_residual_checked(device):
    x = torch.randn(2, 3, 4, 5, device=device)
    with pytest.raises(RuntimeError, match=r"residual should have the input's shape"):
        fusedbn.batch_norm_relu(x, None, None, training=True, residual=torch.randn(2, 3, 4, 4, device=device))
    with pytest.raises(RuntimeError, match=r"residual should have dtype Float, got Double"):
        fusedbn.batch_norm_relu(x, None, None, training=True, residual=x.double())


def test_module_surface():
    bn = nn.BatchNorm2d(4)
    fused = fusedbn.FusedBatchNormReLU2d(4)
    fused.load_state_dict(bn.state_dict())
    assert isinstance(fused, nn.BatchNorm2d)
    assert "relu=True" in repr(fused)
    assert fused.state_dict().keys() == bn.state_dict().keys()


@pytest.mark.slow  # whole models
@pytest.mark.parametrize("name,counts", [("resnet18", (8, 8, 4)), ("resnet50", (32, 16, 5))])
def test_fuse_model_on_resnets(name, counts):
    """Every basic block / bottleneck fused, in place; outputs, gradients and running stats equal the
    original's (in float64, so any difference is the rewrite's, not rounding's)."""
    torch.manual_seed(0)
    model = getattr(torchvision_models(), name)(weights=None).double()
    fused, report = copy.deepcopy(model), fusedbn.Report()
    assert fusedbn.fuse_model(fused, report=report) is fused and type(fused) is type(model)
    assert (report.count("fused", "relu"), report.count("fused", "add+relu"), report.count("converted")) == counts
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(fusedbn.FusedBatchNormReLU2d) == counts[0] + counts[1]
    assert kinds.count(fusedbn.FusedBatchNorm2d) == counts[2] and nn.BatchNorm2d not in kinds
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    y, y_fused = model(x), fused(x)
    torch.testing.assert_close(y_fused, y, rtol=1e-9, atol=1e-9)
    y.square().sum().backward()
    y_fused.square().sum().backward()
    for (pname, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-7 * p.grad.abs().max().item(), msg=pname)
    assert_same_state(fused, model, rtol=1e-9, atol=1e-9)
    model.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


# torchvision models whose code branches on the mode (stochastic depth, aux heads) or calls relu as a
# function; input size, and the BatchNorm+activation pairs fuse_model fuses (of all BatchNorm layers: the
# others have no activation after them, or, in RegNet, the add and relu after them are the parent's code):
# SiLU in EfficientNets (33/49, 72/110), ReLU6 in MobileNetV2 (35/52), Hardswish and ReLU in MobileNetV3.
ZOO = [("efficientnet_b0", 64, 33), ("efficientnet_v2_s", 64, 72), ("googlenet", 64, 59), ("inception_v3", 299, 96),
       ("densenet121", 64, 120), ("mobilenet_v2", 64, 35), ("mobilenet_v3_large", 64, 31), ("regnet_y_400mf", 64, 33)]


@pytest.mark.slow  # whole models
@pytest.mark.parametrize("name,size,fused_count", ZOO)
@pytest.mark.parametrize("fuse_in", ["train", "eval"])
def test_fuse_model_keeps_what_the_model_computes(name, size, fused_count, fuse_in):
    """Fused in either mode, then run in training (an SGD step), eval and training again (the RNG reseeded,
    so dropout and stochastic depth draw the same), the model computes what the original does, in float64:
    outputs, parameters, running statistics. It keeps its class; and a second fuse_model changes nothing."""
    torch.manual_seed(0)
    extra = {"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision_models(), name)(weights=None, **extra).double()
    fused = copy.deepcopy(model).train(fuse_in == "train")
    report = fusedbn.Report()
    fusedbn.fuse_model(fused, report=report)
    assert report.count("fused") == fused_count and type(fused) is type(model), str(report)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, fused)]
    for training in (True, False, True):  # an SGD step in each training pass
        model.train(training)
        fused.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        ours = fused(x)
        assert type(ours) is type(expected)  # googlenet, inception: a namedtuple in training, a tensor in eval
        for mine, theirs in zip(*(o if isinstance(o, tuple) else (o,) for o in (ours, expected))):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
        if training:
            for output, optimizer in zip((expected, ours), optimizers):
                (output[0] if isinstance(output, tuple) else output).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
    assert_same_state(fused, model, rtol=1e-9, atol=1e-9)
    again = fusedbn.Report()
    fusedbn.fuse_model(fused, report=again)
    assert again.count("fused") == 0


def test_fuse_model_keeps_semantics_where_it_cannot_fuse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_twice = nn.BatchNorm2d(3)  # its output also feeds the sum below: not fusable
            self.bn_relu = nn.BatchNorm2d(3)
            self.bn_hooked = nn.BatchNorm2d(3)  # a hook would see relu's output: not fused

        def forward(self, x):
            y = self.bn_twice(x)
            return torch.relu(y) + y + nn.functional.relu(self.bn_relu(x)) + torch.relu(self.bn_hooked(x))

    net = Net()
    seen = []
    net.bn_hooked.register_forward_hook(lambda module, args, out: seen.append(out.min().item()))
    reference = copy.deepcopy(net)
    report = fusedbn.Report()
    fusedbn.fuse_model(nn.Sequential(net), report=report)  # a model's submodules are rewritten, not the model
    assert [name for action, name, _ in report.done if action == "fused"] == ["0.bn_relu"]
    assert type(net.bn_twice) is fusedbn.FusedBatchNorm2d and type(net.bn_hooked) is fusedbn.FusedBatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(net(x), reference(x))
    assert seen[0] < 0 and seen[1] < 0  # both hooks saw BatchNorm's own output


def test_fuse_model_leaves_a_batch_norm_with_a_backward_hook_alone():
    """Fused, the BatchNorm's grad_output would be relu's input gradient, not its own."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    grads = []
    model[0].register_full_backward_hook(lambda module, grad_input, grad_output: grads.append(grad_output[0]))
    fusedbn.fuse_model(model)
    assert type(model[0]) is fusedbn.FusedBatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    model(x).sum().backward()
    assert (grads[0] == 0).any() and ((grads[0] == 0) | (grads[0] == 1)).all()  # relu's mask reached the hook


def test_fuse_model_leaves_mode_dependent_code_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) if self.training else y  # a graph traced in one mode is wrong in the other

    net = Net().eval()
    report = fusedbn.Report()
    fusedbn.fuse_model(nn.Sequential(net), report=report)
    assert report.count("fused") == 0 and "differs between training and eval" in report.skipped[0][1]
    x = torch.randn(2, 3, 4, 4)
    assert (net(x) < 0).any()
    net.train()
    assert (net(x) >= 0).all()


def test_fuse_model_leaves_untraceable_code_alone():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(x)) if x.sum() > 0 else self.bn(x)  # data-dependent: not traceable

    model, report = Dynamic(), fusedbn.Report()
    fusedbn.fuse_model(nn.Sequential(model), report=report)
    assert "cannot trace" in report.skipped[0][1] and report.count("converted") == 1
    assert type(model.bn) is fusedbn.FusedBatchNorm2d


def test_fused_model_pickles_and_reverts():
    """A fused model survives torch.save/load and deepcopy; revert_model gives back torch's modules and
    forwards, computing the same."""
    torch.manual_seed(0)
    model = torchvision_models().resnet18(weights=None).double().eval()
    fused = fusedbn.fuse_model(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(fused)):
        torch.testing.assert_close(other(x), model(x), rtol=1e-9, atol=1e-9)
    report = fusedbn.Report()
    assert fusedbn.revert_model(fused, report=report) is fused
    assert report.count("reverted", "BatchNorm2d") == 20
    assert all(type(m).__module__.startswith(("torch.", "torchvision.")) for m in fused.modules())
    assert not any("forward" in m.__dict__ for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


def test_fuse_model_undoes_itself_when_a_traced_branch_changes():
    """A branch on a plain attribute is frozen by the trace: once the attribute changes, the fusion of that
    module is undone (with a warning) and its own code runs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.use_relu = True

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) if self.use_relu else y

    net = fusedbn.fuse_model(nn.Sequential(Net()))[0]
    assert type(net.bn) is fusedbn.FusedBatchNormReLU2d
    x = torch.randn(2, 3, 4, 4)
    assert (net(x) >= 0).all()
    net.use_relu = False
    with pytest.warns(UserWarning, match=r"Net changed since it was fused \(use_relu\); its fusion is undone"):
        y = net(x)
    assert (y < 0).any() and type(net.bn) is fusedbn.FusedBatchNorm2d and "forward" not in net.__dict__
    torch.testing.assert_close(net(x), y)


def test_fuse_model_passes_through_a_dropout_of_probability_zero():
    """BatchNorm, Dropout(0.0), activation (MONAI's ADN blocks) fuses: the dropout returns its input in training
    and eval. A dropout with p > 0 stops the pattern, and one whose p changes after fusing undoes the fusion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.0), nn.ReLU()),
                          nn.Sequential(nn.BatchNorm2d(3), nn.Dropout2d(0.0), nn.Dropout(0.0), nn.SiLU()),
                          nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.2), nn.ReLU()),
                          nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.3))).double()
    reference = copy.deepcopy(model)
    report = fusedbn.Report()
    fusedbn.fuse_model(model, report=report)
    assert [d for _, _, d in report.done] == ["relu", "silu", "relu", ""] and report.count("converted") == 1
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for training in (True, False):
        model.train(training), reference.train(training)
        torch.manual_seed(1)
        ours = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours, reference(x), rtol=1e-12, atol=1e-12)
    model.train(), reference.train()
    model[0][1].p = reference[0][1].p = 0.5
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match=r"Sequential changed since it was fused \(dropout p\)"):
        ours = model(x)
    torch.manual_seed(2)
    torch.testing.assert_close(ours, reference(x), rtol=1e-12, atol=1e-12)
    assert type(model[0][0]) is fusedbn.FusedBatchNorm2d
    assert type(model[3][0]) is fusedbn.FusedBatchNormReLU2d  # a dropout the pattern did not pass through: kept
    model[3][2].p = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model[3](x)
    assert type(model[3][0]) is fusedbn.FusedBatchNormReLU2d
