"""PReLU as a fused activation (issue 29): its weight (1 or C values) is a tensor beside the activation's name,
with a gradient of its own. The functional form against torch's ``F.prelu(F.batch_norm(x) [+ r], a)`` in
float64 (every gradient, the PReLU weight's included; vmap, forward-mode AD, the backward op's own
derivatives), rejected calls, the hand-built module, and fuse_model on models with ``nn.PReLU`` modules: the
weight stays the nn.PReLU's parameter, and revert_model, freeze, fold_conv_bn, convert_sync_batchnorm,
torch.export, torch.compile, TorchScript and ONNX keep it. test_epilogue.py (dtypes, layouts, shapes),
test_double_backward.py (gradgradcheck, jvp) and test_transforms.py run prelu among every activation;
test_prelu_ops.py calls the ops directly."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import fusedbn
from helpers import assert_same_grads, assert_same_state, make_input, randomize_batch_norms


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def _problem(device, shape=(4, 3, 5, 6), layout="contiguous", slopes=3, seed=0):
    """(x, residual, weight, bias, PReLU's weight), float64 leaves that want gradients (the slopes in
    [-0.5, 1), per channel or one), and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = make_input(shape, layout, torch.float64, device, mean=0.3, generator=gen)
    r = make_input(shape, "contiguous", torch.float64, device, generator=gen)
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    a = torch.rand(slopes, generator=gen, dtype=torch.float64) * 1.5 - 0.5
    running = (torch.randn(c, generator=gen, dtype=torch.float64).to(device),
               (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(device))
    return [t.to(device).requires_grad_() for t in (x, r, w, b, a)], running


def _function(library, training, running, with_residual=True):
    """``prelu(bn(x) [+ r], a)`` as a function of (x, r, w, b, a): fusedbn's fused call, or torch's modules'
    functions; each call on fresh copies of the running statistics."""

    def fn(x, r, w, b, a):
        stats = [s.clone() for s in running]
        r = r if with_residual else None
        if library == "fusedbn":
            return fusedbn.batch_norm_act(x, *stats, w, b, training, residual=r, activation="prelu",
                                          activation_weight=a)
        y = F.batch_norm(x, *stats, w, b, training)
        return F.prelu(y if r is None else y + r, a)

    return fn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("slopes", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True], ids=["bn-prelu", "bn-add-prelu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_functional_matches_torch(device, training, slopes, with_residual, layout):
    """Output (its memory format too), running statistics and every gradient (PReLU's weight's, in its shape)
    are torch's, in float64."""
    leaves, running = _problem(device, layout=layout, slopes=slopes)
    stats = {name: [s.clone() for s in running] for name in ("fusedbn", "torch")}
    y = fusedbn.batch_norm_act(leaves[0], *stats["fusedbn"], *leaves[2:4], training,
                               residual=leaves[1] if with_residual else None, activation="prelu",
                               activation_weight=leaves[4])
    y_torch = F.batch_norm(leaves[0], *stats["torch"], *leaves[2:4], training)
    expected = F.prelu(y_torch + leaves[1] if with_residual else y_torch, leaves[4])
    _close(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    _close(stats["fusedbn"], stats["torch"])
    grad = torch.randn_like(expected)
    targets = [t for i, t in enumerate(leaves) if with_residual or i != 1]
    for mine, torchs in zip(torch.autograd.grad(y, targets, grad), torch.autograd.grad(expected, targets, grad)):
        _close(mine, torchs)


def test_weight_of_any_shape_with_one_or_c_values(device):
    """The ops read the weight flattened (as its 1 or C values); its gradient keeps its shape."""
    leaves, running = _problem(device, slopes=3)
    x, _, w, b, a = leaves
    for shaped in (a.detach().view(3, 1), a.detach()[:1].view(())):
        shaped.requires_grad_()
        y = fusedbn.batch_norm_act(x, None, None, w, b, True, activation="prelu", activation_weight=shaped)
        _close(y, F.prelu(F.batch_norm(x, None, None, w, b, True), shaped.reshape(-1)))
        (grad,) = torch.autograd.grad(y.sum(), shaped)
        assert grad.shape == shaped.shape


def test_rejected_calls_change_nothing(device):
    """PReLU needs its weight (ValueError), no other activation takes one (ValueError), and the weight has 1 or
    C values (RuntimeError, as F.prelu raises); running statistics stay as they were."""
    (x, _, w, b, a), running = _problem(device)
    stats = [s.clone() for s in running]
    calls = [(ValueError, "'prelu' needs its weight", dict(activation="prelu")),
             (ValueError, "activation_weight is PReLU's weight, but the activation is 'relu'",
              dict(activation="relu", activation_weight=a)),
             (RuntimeError, "should have 1 or 3 elements", dict(activation="prelu", activation_weight=a[:2])),
             (ValueError, "takes no parameter", dict(activation="prelu", activation_param=0.1, activation_weight=a))]
    for error, message, kwargs in calls:
        with pytest.raises(error, match=message):
            fusedbn.batch_norm_act(x, *stats, w, b, True, **kwargs)
        _close(stats, list(running))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_of_gradients_of_the_backward_op(device, training):
    """The fused backward op's own autograd (BackwardFunction, for direct op calls and exported programs):
    differentiated through the composition in torch's ops, as PReLU's act' is its weight, an input. Against
    torch's double backward, in float64; SiLU's too (its act' is smooth)."""
    (x, _, w, b, a), running = _problem(device)
    for act, act_weight in (("prelu", a), ("silu", None)):
        if training:
            y, mean, invstd = fusedbn.ops.forward_train(x, w, b, None, None, 0.1, 1e-5, None, act, 0.0, act_weight)
        else:
            y = fusedbn.ops.forward_eval(x, w, b, *running, 1e-5, None, act, 0.0, act_weight)
            mean, invstd = running[0], torch.rsqrt(running[1] + 1e-5)
        dy = torch.randn_like(y).requires_grad_()
        grads = fusedbn.ops.backward(dy, x, w, mean, invstd, training, [True, True, True], b, None, None, act, 0.0,
                                     False, act_weight, act_weight is not None)
        z = F.batch_norm(x, *(None, None) if training else running, w, b, training, 0.1, 1e-5)
        expected = F.prelu(z, a) if act == "prelu" else F.silu(z)
        targets = (x, w, b) + ((a,) if act == "prelu" else ())
        expected_grads = torch.autograd.grad(expected, targets, dy, create_graph=True)
        grads = [g for g in grads if g is not None]
        for g, e in zip(grads, expected_grads):
            _close(g, e)
        loss = sum((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)).sin().sum() for g in grads)
        expected_loss = sum((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)).sin().sum()
                            for g in expected_grads)
        inputs = (dy,) + targets
        for g, e in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected_loss, inputs)):
            _close(g, e)


# ---- torch.func ----

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("slopes", [1, 3])
@pytest.mark.parametrize("batched_slopes", [False, True], ids=["shared-slopes", "batched-slopes"])
def test_vmap(device, training, slopes, batched_slopes):
    """vmap over 4 problems (inputs, residuals, and the PReLU weight batched or shared): the values and the
    gradients (vmap of grad, per problem) of torch's composition."""
    gen = torch.Generator().manual_seed(1)
    x, r = (torch.randn(4, 3, 3, 4, 4, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    w, b = (torch.rand(3, generator=gen, dtype=torch.float64).to(device) + 0.5 for _ in range(2))
    a = (torch.rand(4 if batched_slopes else 1, slopes, generator=gen, dtype=torch.float64) - 0.3).to(device)
    a = a if batched_slopes else a[0]
    stats = (None, None) if training else (torch.randn(3, generator=gen, dtype=torch.float64).to(device),
                                           torch.rand(3, generator=gen, dtype=torch.float64).to(device) + 1)
    in_dims = (0, 0, 0 if batched_slopes else None)

    def of(library):
        def fn(x, r, a):
            if library == "fusedbn":
                return fusedbn.batch_norm_act(x, *stats, w, b, training, residual=r, activation="prelu",
                                              activation_weight=a)
            return F.prelu(F.batch_norm(x, *stats, w, b, training) + r, a)
        return fn

    _close(vmap(of("fusedbn"), in_dims)(x, r, a), vmap(of("torch"), in_dims)(x, r, a))
    for argnums in (0, 2):
        grads = [vmap(torch.func.grad(lambda *args, fn=of(name): fn(*args).square().sum(), argnums), in_dims)(x, r, a)
                 for name in ("fusedbn", "torch")]
        _close(*grads)


def test_vmap_of_the_backward_op(device):
    """The fused backward's vmap rule (its autograd.Function's, which torch.func transforms apply): PReLU's
    weight gradient per problem, in one problem's weight's shape, shared or batched."""
    from fusedbn._functions import batch_norm_backward
    gen = torch.Generator().manual_seed(2)
    x, dy = (torch.randn(4, 3, 3, 2, 2, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    w = torch.rand(3, generator=gen, dtype=torch.float64).to(device) + 0.5
    mean, var = x.mean((1, 3, 4)), x.var((1, 3, 4), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    for a in (torch.tensor([0.2], dtype=torch.float64, device=device),
              torch.rand(4, 3, generator=gen, dtype=torch.float64).to(device)):
        in_dims = (0, 0, 0, 0, 0 if a.dim() == 2 else None)

        def ours(x, dy, mean, invstd, a):
            grads = batch_norm_backward(dy, x, w, mean, invstd, True, [True, True, False], None, None, None,
                                        ("prelu", 0.0), False, a, True)
            return tuple(g for g in grads if g is not None)

        def theirs(x, dy, a):
            x, w_, a = (t.detach().requires_grad_() for t in (x, w, a))
            return torch.autograd.grad(F.prelu(F.batch_norm(x, None, None, w_, None, True), a), (x, w_, a), dy)

        mine = vmap(ours, in_dims)(x, dy, mean, invstd, a)
        per_problem = [theirs(x[k], dy[k], a[k] if a.dim() == 2 else a) for k in range(4)]
        for g, e in zip(mine, zip(*per_problem)):
            _close(g, torch.stack(e))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad(device, training):
    """jvp with tangents on every input (PReLU's weight's adds min(z, 0) times its tangent): torch's."""
    leaves, running = _problem(device, slopes=1)
    primals = tuple(t.detach() for t in leaves)
    tangents = tuple(torch.randn_like(t) for t in primals)
    ours = torch.func.jvp(_function("fusedbn", training, running), primals, tangents)
    theirs = torch.func.jvp(_function("torch", training, running), primals, tangents)
    _close(ours, theirs)


# ---- the module built by hand ----

def test_module_owns_its_weight():
    """FusedBatchNormAct2d(C, activation="prelu") holds PReLU's weight, the parameter activation_weight: C values
    (or activation_num_parameters=1), 0.25 as nn.PReLU's; state_dict loads from BatchNorm2d + PReLU."""
    module = fusedbn.FusedBatchNormAct2d(3, activation="prelu")
    assert dict(module.named_parameters()).keys() == {"weight", "bias", "activation_weight"}
    torch.testing.assert_close(module.activation_weight, torch.full((3,), 0.25), rtol=0, atol=0)
    assert "activation='prelu'" in repr(module)
    single = fusedbn.FusedBatchNormAct2d(3, activation="prelu", activation_num_parameters=1)
    assert single.activation_weight.shape == (1,)
    for kwargs, message in ((dict(activation="prelu", activation_num_parameters=2), "should be 1 or num_features"),
                            (dict(activation="relu", activation_num_parameters=1), "num_parameters is PReLU's"),
                            (dict(activation="prelu", activation_param=0.1), "takes no parameter")):
        with pytest.raises(ValueError, match=message):
            fusedbn.FusedBatchNormAct2d(3, **kwargs)
    bn, prelu = randomize_batch_norms(nn.BatchNorm2d(3)), nn.PReLU(3, init=0.1)
    module.load_state_dict({**bn.state_dict(), "activation_weight": prelu.weight.detach()})
    x = torch.randn(2, 3, 4, 4)
    for training in (True, False):
        module.train(training), bn.train(training)
        torch.testing.assert_close(module(x), prelu(bn(x)))
    with torch.no_grad():
        module.activation_weight.fill_(7.0)
    module.reset_parameters()
    torch.testing.assert_close(module.activation_weight, torch.full((3,), 0.25), rtol=0, atol=0)


def test_module_trains_its_weight_and_takes_the_callers(device):
    """The module's weight gets its gradient and an optimizer step, as the nn.PReLU's; a weight passed to the
    call (what fuse_model's code passes) is used instead."""
    torch.manual_seed(0)
    ours = fusedbn.FusedBatchNormAct2d(3, activation="prelu", device=device, dtype=torch.float64)
    bn = nn.BatchNorm2d(3, device=device, dtype=torch.float64)
    prelu = nn.PReLU(3, device=device, dtype=torch.float64)
    x, r = (torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device) for _ in range(2))
    optimizers = [torch.optim.SGD(m, lr=0.5) for m in (ours.parameters(), [*bn.parameters(), *prelu.parameters()])]
    for _ in range(2):
        for output, optimizer in zip((ours(x, r), prelu(bn(x) + r)), optimizers):
            output.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    _close(ours.activation_weight, prelu.weight)
    _close(ours(x, r), prelu(bn(x) + r))
    other = torch.tensor([-0.5], dtype=torch.float64, device=device)
    _close(ours(x, None, other), F.prelu(bn(x), other))


def test_module_rejects_a_wrong_weight_and_changes_nothing(device):
    """A weight of another size or dtype, a weight for another activation, or none for a fused PReLU without its
    own (as fuse_model makes them): refused before the running statistics or num_batches_tracked move, whether
    the residual is fused or added after (broadcast)."""
    x = torch.randn(4, 3, 2, 2, device=device)
    made_by_fuse = fusedbn.FusedBatchNormAct2d(3, device=device)
    made_by_fuse.activation = "prelu"
    cases = [(fusedbn.FusedBatchNormAct2d(3, activation="prelu", device=device), (None, torch.ones(2, device=device)),
              RuntimeError, "should have 1 or 3 elements"),
             (fusedbn.FusedBatchNormReLU2d(3, device=device), (None, torch.ones(3, device=device)), ValueError,
              "but the activation is 'relu'"),
             (made_by_fuse, (), ValueError, "'prelu' needs its weight"),
             (made_by_fuse, (None, torch.ones(3, device=device, dtype=torch.float64)), RuntimeError,
              r"mixed dtype: expect PReLU's weight \(activation_weight\)")]
    for module, args, error, message in cases:
        for residual in (None, torch.randn(3, 1, 1, device=device)):  # fused, and added after (broadcast)
            before = copy.deepcopy(module.state_dict())
            with pytest.raises(error, match=message):
                module(x, residual, *args[1:])
            torch.testing.assert_close(module.state_dict(), before, rtol=0, atol=0)


def test_module_scripts_and_checkpoints():
    """TorchScript compiles the module to torch's ops (its own weight, or the caller's); non-reentrant
    checkpointing gives its gradients."""
    torch.manual_seed(0)
    module = randomize_batch_norms(fusedbn.FusedBatchNormAct2d(4, activation="prelu")).double()
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)
    assert "fusedbn::" not in str(scripted.inlined_graph)
    x, r = (torch.randn(3, 4, 5, 5, dtype=torch.float64) for _ in range(2))
    other = torch.rand(1, dtype=torch.float64)
    for training in (False, True):
        module.train(training), scripted.train(training)
        _close(scripted(x, r), module(x, r))
        _close(scripted(x, None, other), module(x, None, other))
    x.requires_grad_()
    y = torch.utils.checkpoint.checkpoint(module, x, r, use_reentrant=False)
    expected = module(x, r)
    _close(y, expected)
    for g, e in zip(torch.autograd.grad(y.sum(), (x, module.activation_weight)),
                    torch.autograd.grad(expected.sum(), (x, module.activation_weight))):
        _close(g, e)


# ---- fuse_model and the transforms after it ----

class _Block(nn.Module):
    """BN -> PReLU (one weight per channel) and BN + add -> PReLU (one weight)."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.PReLU(c, init=0.1)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.PReLU()

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + x)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Block(), _Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 0.8)
    return randomize_batch_norms(model).double()


def _fused(model):
    report = fusedbn.Report()
    fused = fusedbn.fuse_model(copy.deepcopy(model), report=report)
    assert report.count("fused", "prelu") == 2 and report.count("fused", "add+prelu") == 2, str(report)
    return fused


def _input(batch=4):
    return torch.randn(batch, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_fuse_model_keeps_the_prelu_weight():
    """Fused, the model computes what it did over SGD steps and in eval, every gradient (the PReLU weights'
    too) and state equal in float64; the PReLU weights stay the nn.PReLU's parameters (the optimizer steps
    them, state_dict keys unchanged), passed to each fused call."""
    model = _model()
    fused = _fused(model)
    block = fused[1]
    assert type(block.bn1) is fusedbn.FusedBatchNormAct2d and block.bn1.activation == "prelu"
    assert type(block.act1) is nn.PReLU and not hasattr(block.bn1, "activation_weight")
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = _input()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, fused)]
    for _ in range(2):
        for m, optimizer in zip((model, fused), optimizers):
            m(x).square().sum().backward()
        assert_same_grads(fused, model, rtol=1e-9, atol=1e-9)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert_same_state(fused, model, rtol=1e-9, atol=1e-9)
    assert not torch.equal(fused[1].act1.weight, _model()[1].act1.weight)  # the steps moved the PReLU weights
    model.eval(), fused.eval()
    _close(fused(x), model(x))
    with torch.no_grad():
        fused[2].act2.weight.fill_(-0.25), model[2].act2.weight.fill_(-0.25)
    _close(fused(x), model(x))


def test_fuse_model_leaves_prelus_it_cannot_pass_the_weight_of():
    """A PReLU with hooks, or called from more than one place, stays its own call."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.act = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.PReLU(3)

        def forward(self, x):
            return self.act(self.bn1(x)) + self.act(self.bn2(x))

    hooked = nn.Sequential(nn.BatchNorm2d(3), nn.PReLU())
    hooked[1].register_forward_hook(lambda *args: None)
    for model in (nn.Sequential(Shared()), hooked):
        reference = copy.deepcopy(model)
        report = fusedbn.Report()
        fusedbn.fuse_model(model, report=report)
        assert report.count("fused") == 0 and report.count("converted") >= 1, str(report)
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(model(x), reference(x))


def test_transforms_after_fuse_model():
    """revert_model, freeze, fold_conv_bn and convert_sync_batchnorm (outside a process group) of the fused
    model compute the torch model's function, with the nn.PReLU weights."""
    model = _model()
    x = _input()
    reverted = fusedbn.revert_model(_fused(model))
    assert not any(type(m).__module__.startswith("fusedbn") for m in reverted.modules())
    synced = fusedbn.convert_sync_batchnorm(_fused(model))
    for m in (reverted, synced):
        reference = copy.deepcopy(model)
        _close(m(x), reference(x))
        assert_same_state(m, reference, rtol=1e-9, atol=1e-9)
    model.eval()
    frozen = fusedbn.freeze(_fused(model).eval())
    assert type(frozen[1].bn1) is fusedbn.FrozenBatchNorm2d and frozen[1].bn1.activation == "prelu"
    assert frozen.state_dict().keys() == fusedbn.freeze(copy.deepcopy(model)).state_dict().keys()
    report = fusedbn.Report()
    folded = fusedbn.fold_conv_bn(_fused(model).eval(), report=report)
    assert report.count("folded") == 4, str(report)
    for m in (frozen, folded):
        _close(m(x), model(x))
    with torch.no_grad():  # the frozen model still reads the nn.PReLU's weight
        frozen[1].act1.weight.mul_(-1), model[1].act1.weight.mul_(-1)
    _close(frozen(x), model(x))


def test_frozen_and_folded_modules_built_by_hand():
    """A FusedBatchNormAct2d(activation="prelu") freezes and folds with its own weight (a buffer once frozen)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fusedbn.FusedBatchNormAct2d(4, activation="prelu",
                                                                         activation_num_parameters=1))
    randomize_batch_norms(model).double().eval()
    with torch.no_grad():
        model[1].activation_weight.fill_(-0.3)
    x = _input()
    frozen = fusedbn.freeze(copy.deepcopy(model))
    assert frozen[1].state_dict()["activation_weight"].item() == -0.3
    folded = fusedbn.fold_conv_bn(model)
    for m in (frozen, folded):
        _close(m(x), model(x))
    assert fusedbn.FrozenBatchNorm2d(4, activation="prelu").activation_weight.shape == (4,)


def test_export_and_trace_of_a_fused_model():
    """torch.export keeps the fused ops, and the training program's gradients reach the nn.PReLU weights;
    jit.trace records torch's ops, F.prelu with the nn.PReLU's weight."""
    model = _model()
    x = _input()
    program = torch.export.export(_fused(model), (x,))
    assert sum("fusedbn.forward_train" in str(n.target) for n in program.graph.nodes) == 4
    exported = program.module()
    exported(x).square().sum().backward()
    model(x).square().sum().backward()
    assert_same_grads(exported, model, rtol=1e-9, atol=1e-9)
    model.eval()
    traced = torch.jit.trace(_fused(model).eval(), x)
    assert "prelu" in str(traced.inlined_graph) and "fusedbn::" not in str(traced.inlined_graph)
    _close(traced(_input(5)), model(_input(5)))


@pytest.mark.slow  # torch.compile, the ONNX exporter
def test_compile_and_onnx_of_a_fused_model():
    """torch.compile(fullgraph) computes torch's model; the ONNX export holds standard operators (PRelu), and
    onnxruntime computes the model."""
    model = _model()
    x = _input()
    compiled = torch.compile(_fused(model), backend="aot_eager", fullgraph=True)
    _close(compiled(x), model(x))
    onnx, onnxruntime = (pytest.importorskip(name, reason=f"pip install .[test] installs {name}")
                         for name in ("onnx", "onnxruntime"))
    pytest.importorskip("onnxscript", reason="pip install .[test] installs onnxscript")
    model = model.eval().float()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_fused(model).eval(), (x.float(),), dynamo=True).save(buffer)
    nodes = onnx.load_from_string(buffer.getvalue()).graph.node
    assert "PRelu" in {node.op_type for node in nodes} and all(node.domain in ("", "ai.onnx") for node in nodes)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), model(x.float()), rtol=1e-4, atol=1e-5)


def test_timm_norm_act_with_prelu():
    """timm's BatchNormAct2d with an nn.PReLU act: its fusedbn twin fuses it, with the act's weight."""
    norm_act = pytest.importorskip("timm.layers.norm_act", reason="pip install .[test] installs timm")
    torch.manual_seed(0)
    layer = norm_act.BatchNormAct2d(4, act_layer=nn.PReLU).double()
    reference = copy.deepcopy(layer)
    model = fusedbn.convert_model(nn.Sequential(layer))
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y, expected = model(x), reference(x)
    _close(y, expected)
    y.sum().backward()
    expected.sum().backward()
    _close(layer.act.weight.grad, reference.act.weight.grad)


def test_lightning_plugin_keeps_fused_prelu():
    """SyncBatchNormPlugin's apply (outside a process group) and revert: the PReLU activations applied, then
    fused again."""
    pytest.importorskip("lightning", reason="pip install .[test] installs lightning")
    from fusedbn.lightning import SyncBatchNormPlugin
    model = _model()
    fused = _fused(model)
    x = _input()
    plugin = SyncBatchNormPlugin()
    synced = plugin.apply(fused)
    _close(synced(x), model(x))
    reverted = plugin.revert(synced)
    assert type(reverted[1].bn1) is fusedbn.FusedBatchNormAct2d and reverted[1].bn1.activation == "prelu"
    _close(reverted(x), model(x))
