"""After training: models converted or fused by fusedbn export (training included), checkpoint, trace with
torch.fx, script and trace with TorchScript, export to ONNX and quantize, each checked against the same model
with torch's BatchNorm (or, where the tool rewrites the model, against eager fusedbn)."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fusedbn
from fusedbn import activations
from helpers import assert_same_grads, assert_same_state, randomize_batch_norms


class _Block(nn.Module):
    """conv-bn-relu, conv-bn, + identity, relu: what fuse_model fuses (bn+relu, bn+add+relu)."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


def _torch_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), _Block(), _Block(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6))
    return randomize_batch_norms(model)


def _models(training, dtype=torch.float32):
    """(torch's model, the same converted, the same converted and fused), in the given mode."""
    reference = _torch_model().to(dtype).train(training)
    converted = fusedbn.convert_model(copy.deepcopy(reference))
    report = fusedbn.Report()
    fused = fusedbn.fuse_model(fusedbn.convert_model(copy.deepcopy(reference)), report=report)
    assert len(report.done) == 4, report  # each block's bn1+relu and bn2+add+relu
    return reference, converted, fused


def _input(batch=3, dtype=torch.float32):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


# ---- torch.export, training included (the ops' own autograd, fusedbn/_op_autograd.py) ----

def test_exported_training_program_differentiates():
    reference, _, fused = _models(training=True, dtype=torch.float64)
    x = _input(dtype=torch.float64)
    program = torch.export.export(fused, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fusedbn.forward_train.default"} <= targets, targets
    exported = program.module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning
        output = exported(x)
        output.square().sum().backward()
    expected = reference(x)
    expected.square().sum().backward()
    torch.testing.assert_close(output, expected)
    assert_same_grads(exported, reference)
    for (name, a), b in zip(exported.named_buffers(), reference.buffers()):  # the running statistics updated
        torch.testing.assert_close(a, b, msg=name)


def test_op_autograd_gradients_of_gradients():
    """Calling the op directly, gradients and gradients of gradients agree with torch's batch_norm."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    y = fusedbn.ops.forward_train(x, w, None, None, None, 0.1, 1e-5)[0]
    expected = F.batch_norm(x, None, None, w, None, True, 0.1, 1e-5)
    grads = torch.autograd.grad(y.sin().sum(), (x, w), create_graph=True)
    expected_grads = torch.autograd.grad(expected.sin().sum(), (x, w), create_graph=True)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), (x, w))
    expected_second = torch.autograd.grad(sum(g.square().sum() for g in expected_grads), (x, w))
    for g, e in zip(second, expected_second):
        torch.testing.assert_close(g, e)


# ---- non-reentrant activation checkpointing, every module and functional form ----

def _module_cases():
    def bn_act(cls, act, param=None):
        return lambda: cls(4, activation=act, activation_param=param)
    torch_act = {"relu": torch.relu, "silu": F.silu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2)}
    return {
        "FusedBatchNorm1d": (lambda: fusedbn.FusedBatchNorm1d(4), lambda: nn.BatchNorm1d(4), (6, 4), None),
        "FusedBatchNorm2d": (lambda: fusedbn.FusedBatchNorm2d(4), lambda: nn.BatchNorm2d(4), (3, 4, 5, 5), None),
        "FusedBatchNorm3d": (lambda: fusedbn.FusedBatchNorm3d(4), lambda: nn.BatchNorm3d(4), (2, 4, 3, 3, 3), None),
        "FusedBatchNormReLU2d+residual": (lambda: fusedbn.FusedBatchNormReLU2d(4), lambda: nn.BatchNorm2d(4),
                                          (3, 4, 5, 5), torch_act["relu"]),
        "FusedBatchNormAct2d(silu)+residual": (bn_act(fusedbn.FusedBatchNormAct2d, "silu"), lambda: nn.BatchNorm2d(4),
                                               (3, 4, 5, 5), torch_act["silu"]),
        "FusedBatchNormAct1d(leaky_relu)": (bn_act(fusedbn.FusedBatchNormAct1d, "leaky_relu", 0.2),
                                            lambda: nn.BatchNorm1d(4), (6, 4), torch_act["leaky_relu"]),
        "FusedSyncBatchNorm": (lambda: fusedbn.FusedSyncBatchNorm(4), lambda: nn.BatchNorm2d(4), (3, 4, 5, 5), None),
    }


def _checkpointed(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_module_cases()))
def test_checkpoint_modules(case, training):
    """Each module under checkpoint(use_reentrant=False) gives torch's module's outputs, gradients and
    statistics under the same checkpoint (the recomputed forward updates the statistics again, as torch's does)."""
    make_ours, make_theirs, shape, act = _module_cases()[case]
    torch.manual_seed(0)
    ours, theirs = make_ours().double().train(training), make_theirs().double().train(training)
    theirs.load_state_dict(ours.state_dict())
    with_residual = "residual" in case
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    r = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x2, r2 = (t.detach().clone().requires_grad_() for t in (x, r))

    def reference(x, r):
        y = theirs(x) + r if with_residual else theirs(x)
        return y if act is None else act(y)

    y = _checkpointed(ours, x, r) if with_residual else _checkpointed(ours, x)
    expected = _checkpointed(reference, x2, r2)
    torch.testing.assert_close(y, expected)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    (expected * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    if with_residual:
        torch.testing.assert_close(r.grad, r2.grad)
    assert_same_grads(ours, theirs)
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("form", ["batch_norm", "batch_norm_relu", "batch_norm_act", "frozen"])
def test_checkpoint_functional_and_frozen(form, training):
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    stats = (torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)
    frozen = fusedbn.FrozenBatchNorm2d(4, activation="hardswish").double()
    calls = {
        "batch_norm": (lambda x, r, w, b, s: fusedbn.batch_norm(x, *s, w, b, training),
                       lambda x, r, w, b, s: F.batch_norm(x, *s, w, b, training)),
        "batch_norm_relu": (lambda x, r, w, b, s: fusedbn.batch_norm_relu(x, *s, w, b, training, residual=r),
                            lambda x, r, w, b, s: torch.relu(F.batch_norm(x, *s, w, b, training) + r)),
        "batch_norm_act": (lambda x, r, w, b, s: fusedbn.batch_norm_act(x, *s, w, b, training, residual=r,
                                                                         activation="gelu_tanh"),
                           lambda x, r, w, b, s: F.gelu(F.batch_norm(x, *s, w, b, training) + r, approximate="tanh")),
        "frozen": (lambda x, r, w, b, s: frozen(x, r),
                   lambda x, r, w, b, s: F.hardswish(F.batch_norm(x, frozen.running_mean, frozen.running_var,
                                                                  frozen.weight, frozen.bias, False) + r)),
    }
    ours, theirs = calls[form]
    inputs = (x, r, w, b)
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    our_stats, their_stats = [s.clone() for s in stats], [s.clone() for s in stats]
    y = _checkpointed(ours, *inputs, our_stats)
    expected = _checkpointed(theirs, *copies, their_stats)
    torch.testing.assert_close(y, expected)
    y.sin().sum().backward()
    expected.sin().sum().backward()
    for t, c in zip(inputs, copies):
        torch.testing.assert_close(t.grad, c.grad)
    for s, e in zip(our_stats, their_stats):
        torch.testing.assert_close(s, e)


# ---- torch.fx ----

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(training):
    """torch.fx's default tracer keeps fusedbn's modules whole (one call_module node each, the residual of a
    fused one its second argument); the traced model computes what the model does, in both modes."""
    reference, _, fused = _models(training)
    traced = torch.fx.symbolic_trace(copy.deepcopy(fused))
    called = [type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"]
    assert called.count(fusedbn.FusedBatchNormReLU2d) == 4 and fusedbn.FusedBatchNorm1d in called, called
    x = _input()
    torch.testing.assert_close(traced(x), reference(x))
    assert_same_state(traced, reference)


def test_fx_converted_model_folds_and_fuses():
    """A converted model, symbolically traced or not, goes through fold_conv_bn (every conv/linear+bn folds)
    and fuse_model (its bn+relu and bn+add+relu fuse), computing what torch's model does."""
    reference, converted, _ = _models(training=False)
    x = _input()
    for model in (converted, torch.fx.symbolic_trace(converted)):
        report = fusedbn.Report()
        folded = fusedbn.fold_conv_bn(model, x, report=report)
        assert len(report.done) == 6, report  # stem, 2 per block, the linear head
        torch.testing.assert_close(folded(x), reference(x))
    report = fusedbn.Report()
    refused = fusedbn.fuse_model(copy.deepcopy(converted), report=report)
    assert len(report.done) == 4, report
    torch.testing.assert_close(refused(x), reference(x))


# ---- TorchScript ----

def _round_trip(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript_script(training):
    """torch.jit.script of a converted model compiles torch's ops (so the saved model loads without
    fusedbn): outputs, and in training the updated statistics, are torch's model's, before and after a
    save/load round trip."""
    reference, converted, _ = _models(training)
    scripted = _round_trip(torch.jit.script(converted))
    graph = str(scripted.inlined_graph)
    assert "fusedbn::" not in graph and "aten::batch_norm" in graph
    x = _input()
    torch.testing.assert_close(scripted(x), reference(x))
    for (name, a), b in zip(scripted.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("make", [
    lambda: fusedbn.FusedBatchNormAct2d(4, activation="leaky_relu", activation_param=0.2),
    lambda: fusedbn.FusedBatchNormReLU2d(4, momentum=None),
    lambda: fusedbn.FrozenBatchNorm2d(4, activation="silu"),
    lambda: fusedbn.FusedBatchNormAct2d(4, activation="prelu"),
    lambda: fusedbn.FrozenBatchNorm2d(4, activation="prelu", activation_num_parameters=1),
], ids=["act", "relu-cumulative", "frozen", "prelu", "frozen-prelu"])
def test_torchscript_script_fused_modules(make):
    torch.manual_seed(0)
    module = make().eval()
    scripted = _round_trip(torch.jit.script(module))
    x, r = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(scripted(x, r), module(x, r))
    if isinstance(module, nn.BatchNorm2d):
        module.train(), scripted.train()
        torch.testing.assert_close(scripted(x, r), module(x, r))
        assert_same_state(scripted, module)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript_script_timm_norm_act(training):
    """timm's BatchNormAct2d scripts; so does its fusedbn twin, to timm's computation."""
    norm_act = pytest.importorskip("timm.layers.norm_act", reason="pip install .[test] installs timm")
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), norm_act.BatchNormAct2d(4, act_layer=nn.SiLU)).train(training)
    converted = fusedbn.convert_model(copy.deepcopy(reference))
    assert type(converted[1]).__name__ == "FusedTimmBatchNormAct2d"
    scripted = _round_trip(torch.jit.script(converted))
    x = _input()
    torch.testing.assert_close(scripted(x), reference(x))
    assert_same_state(scripted, reference)


@pytest.mark.parametrize("name", activations.NAMES)
def test_scripted_activation_is_apply(name):
    z = torch.linspace(-8, 8, 102, dtype=torch.float64).view(1, 2, 51)
    spec = activations.spec(name, 0.3 if name in activations.DEFAULT_PARAM else None)
    weight = torch.tensor([0.2, -0.4], dtype=torch.float64) if name == "prelu" else None
    torch.testing.assert_close(activations.apply_scripted(*spec, z, None, weight),
                               activations.apply(spec, z, None, weight), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["converted", "fused"])
def test_torchscript_trace(which):
    """torch.jit.trace records torch's ops (no Python op, so torch.jit.save works) and checks itself."""
    reference, converted, fused = _models(training=False)
    model = converted if which == "converted" else fused
    x = _input()
    traced = _round_trip(torch.jit.trace(model, x))
    torch.testing.assert_close(traced(_input(5)), reference(_input(5)))


def test_torchscript_script_of_fused_model_says_what_to_do():
    _, _, fused = _models(training=False)
    with pytest.raises(Exception, match="torch.jit.trace"):
        torch.jit.script(fused)


# ---- ONNX ----

def _onnx_libraries():
    """onnx and onnxruntime (and onnxscript, which the dynamo exporter imports), or the calling test skipped
    where one is not installed."""
    libraries = [pytest.importorskip(name, reason=f"pip install .[test] installs {name}")
                 for name in ("onnx", "onnxruntime", "onnxscript")]
    return libraries[0], libraries[1]


def _onnx_export(model, x, dynamo):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation
        if dynamo:
            torch.onnx.export(model, (x,), dynamo=True).save(buffer)
        else:
            torch.onnx.export(model, (x,), buffer, dynamo=False, dynamic_axes={"input": {0: "batch"}},
                              input_names=["input"])
    return buffer.getvalue()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("which", ["converted", "fused"])
def test_onnx_export(which, dynamo):
    """Both exporters turn eval-mode fusedbn modules into standard ONNX operators; onnxruntime computes what
    eager fusedbn does."""
    onnx, onnxruntime = _onnx_libraries()
    reference, converted, fused = _models(training=False)
    model = converted if which == "converted" else fused
    x = _input()
    exported = _onnx_export(model, x, dynamo)
    graph = onnx.load_from_string(exported).graph
    kinds = {node.op_type for node in graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), kinds
    assert {"Relu", "Add"} <= kinds, kinds
    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(actual), reference(x), rtol=1e-4, atol=1e-5)


def test_onnx_export_keeps_batch_normalization():
    """Unfolded (no conv before it), the BatchNorm is ONNX's BatchNormalization, the activation its own op."""
    onnx, onnxruntime = _onnx_libraries()
    module = nn.Sequential(fusedbn.FusedBatchNormAct2d(4, activation="hardswish")).eval()
    x = torch.randn(2, 4, 3, 3)
    for dynamo in (True, False):
        exported = _onnx_export(module, x, dynamo)
        kinds = [node.op_type for node in onnx.load_from_string(exported).graph.node]
        assert "BatchNormalization" in kinds and "HardSwish" in kinds, kinds
        session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(actual), module(x), rtol=1e-5, atol=1e-5)


# ---- quantization ----

def _conv_bn_relu_model():
    """conv-bn-relu twice, converted: what the quantization flows fuse and fold, without a residual add
    (eager mode would need FloatFunctional for it, torchao's X86 quantizer rejects it even in torch's model)."""
    model = _torch_model()
    return fusedbn.convert_model(nn.Sequential(model[0], model[1], nn.ReLU(), model[3].conv1, model[3].bn1,
                                               nn.ReLU()).eval())


def test_eager_quantization_after_revert_model():
    """torch.ao.quantization knows torch's classes only: fusedbn.revert_model (on a copy) is the one call that
    gives fuse_modules, prepare and convert a model they accept."""
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, get_default_qconfig, prepare
    converted = _conv_bn_relu_model()
    model = fusedbn.revert_model(copy.deepcopy(converted))
    fuse_modules(model, [["0", "1", "2"], ["3", "4", "5"]], inplace=True)
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    model = nn.Sequential(QuantStub(), model, DeQuantStub())
    model.qconfig = get_default_qconfig("x86")
    prepared = prepare(model)
    x = _input()
    prepared(x)
    quantized = convert(prepared)
    assert (quantized(x) - converted(x)).abs().max() < 0.1  # int8's rounding, not a different function


def test_fx_quantization():
    """prepare_fx traces a converted model (fusedbn's modules stay whole, left in float); after revert_model
    it fuses conv+bn as for torch's model. Both quantized models compute the float model's function."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    _, converted, _ = _models(training=False)
    x = _input()
    for model in (converted, fusedbn.revert_model(copy.deepcopy(converted))):
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        quantized = convert_fx(prepared)
        assert (quantized(x) - converted(x)).abs().max() < 0.2


def test_pt2e_quantization_after_revert_model():
    """PT2E (torchao): export the reverted model; prepare_pt2e folds its BatchNorms into the convolutions."""
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="pip install .[test] installs torchao")
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    converted = _conv_bn_relu_model()
    x = _input()
    program = torch.export.export(fusedbn.revert_model(copy.deepcopy(converted)), (x,)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(program, quantizer)
    prepared(x)
    quantized = pt2e.convert_pt2e(prepared)
    targets = {str(n.target) for n in quantized.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t or "fusedbn" in t for t in targets), targets
    assert (quantized(x) - converted(x)).abs().max() < 0.1
