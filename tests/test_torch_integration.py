"""The ops pass torch.library.opcheck; models using fusedbn compile with torch.compile(fullgraph=True) to torch's
graph, and torch.export keeps the fusedbn ops."""
import copy

import pytest
import torch
from torch import nn

import fusedbn
from helpers import assert_same_grads, assert_same_state, make_input



def _samples(device, layout, dtype=torch.float32, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = make_input((3, 4, 5, 6), layout, dtype, device)
    w = torch.rand(4, device=device, dtype=param_dtype) + 0.5
    b = torch.randn(4, device=device, dtype=param_dtype)
    rm = torch.randn(4, device=device, dtype=param_dtype)
    rv = torch.rand(4, device=device, dtype=param_dtype) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)], ids=["fp32", "bf16-fp32"])
def test_opcheck(device, layout, dtype, param_dtype):
    x, w, b, rm, rv = _samples(device, layout, dtype, param_dtype)
    stat_dtype = torch.float32
    mean = torch.randn(4, device=device, dtype=stat_dtype)
    invstd = torch.rand(4, device=device, dtype=stat_dtype) + 0.5
    dy = make_input(x.shape, layout, dtype, device)
    r = make_input(x.shape, "contiguous", dtype, device)
    out = torch.relu(make_input(x.shape, layout, dtype, device))
    calls = [
        (fusedbn.ops.forward_train, (x, w, b, rm, rv, 0.1, 1e-5, r, "relu")),
        (fusedbn.ops.forward_train, (x, w, b, None, None, 0.1, 1e-5, None, "relu")),
        (fusedbn.ops.forward_train, (x, w, b, None, None, 0.1, 1e-5, r, "silu")),
        (fusedbn.ops.forward_eval, (x, w, b, rm, rv, 1e-5, r, "relu")),
        (fusedbn.ops.forward_eval, (x, w, b, rm, rv, 1e-5, None, "leaky_relu", 0.2)),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, True, [True, True, True], b, None, None, "relu", 0.0, False)),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, True, [True, True, True], None, out, None, "relu", 0.0, True)),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, False, [False, True, False], b, out, None, "relu", 0.0, True)),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, True, [True, True, True], b, None, r, "gelu", 0.0, True)),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, False, [True, True, True], b, None, None, "elu", 0.5, False)),
        (fusedbn.ops.batch_stats, (x,)),
        (fusedbn.ops.grad_sums, (dy, x, w, mean, invstd)),
        (fusedbn.ops.grad_sums, (dy, x, w, mean, invstd, b, None, None, "relu")),
        (fusedbn.ops.grad_sums, (dy, x, w, mean, invstd, b, None, r, "hardswish")),
        (fusedbn.ops.backward_elemt, (dy, x, w, mean, invstd, mean, invstd)),
        (fusedbn.ops.backward_elemt, (dy, x, None, mean, invstd, mean, invstd, None, out, None, "relu", 0.0, True)),
        (fusedbn.ops.backward_elemt, (dy, x, w, mean, invstd, mean, invstd, b, None, r, "gelu_tanh", 0.0, True)),
        (fusedbn.ops.forward_train, (x, w, b, rm, rv, 0.1, 1e-5)),
        (fusedbn.ops.forward_train, (x, None, None, None, None, 0.1, 1e-5)),
        (fusedbn.ops.forward_eval, (x, w, b, rm, rv, 1e-5)),
        (fusedbn.ops.forward_eval, (x, None, None, rm, rv, 1e-5)),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, True, [True, True, True])),
        (fusedbn.ops.backward, (dy, x, w, mean, invstd, False, [True, True, True])),
        (fusedbn.ops.backward, (dy, x, None, mean, invstd, True, [True, False, False])),
    ]
    for op, args in calls:
        # Every utility, the autograd registration and AOT autograd's backward included: the differentiable
        # tensors require grad (fusedbn/_op_autograd.py).
        args = [a.detach().requires_grad_(not any(a is s for s in (rm, rv, mean, invstd)))
                if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(op, args)


class _TorchBatchNormReLU2d(nn.BatchNorm2d):
    """What FusedBatchNormReLU2d computes, in torch's modules (same parameters and buffers)."""

    def forward(self, input, residual):
        return torch.relu(super().forward(input) + residual)


class _Net(nn.Module):
    def __init__(self, bn2d=fusedbn.FusedBatchNorm2d, bn_relu2d=fusedbn.FusedBatchNormReLU2d,
                 bn1d=fusedbn.FusedBatchNorm1d):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = bn2d(6)
        self.bn_relu = bn_relu2d(6)
        self.bn1d = bn1d(6)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn_relu(self.bn(y), y)
        return self.bn1d(y.mean(dim=(2, 3)))


def _torch_net():
    return _Net(nn.BatchNorm2d, _TorchBatchNormReLU2d, nn.BatchNorm1d)


class _GraphRecorder:
    """A torch.compile backend that runs the graph dynamo hands it (through aot_eager) and keeps the ops
    AOT autograd traced, forward and backward."""

    def __init__(self):
        self.targets = set()

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def record(graph, _inputs):
            self.targets |= {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
            return graph

        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_gives_torchs_graph(device, training):
    """Under torch.compile, a fusedbn model compiles to exactly what the same model with nn.BatchNorm*d
    compiles to (inductor can then fuse it with its neighbours): the same outputs, gradients and state,
    bit for bit, and no fusedbn op in the graphs; eager fusedbn agrees with both to float64 rounding."""
    torch.manual_seed(0)
    eager = _Net().to(device).double().train(training)
    ours, theirs = _Net().to(device).double(), _torch_net().to(device).double()
    for model in (ours, theirs):
        model.load_state_dict(eager.state_dict())
        model.train(training)
    recorder = _GraphRecorder()
    compiled_ours = torch.compile(ours, backend=recorder, fullgraph=True)
    compiled_theirs = torch.compile(theirs, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 8, 8, device=device, dtype=torch.float64)
        outputs = [model(x) for model in (compiled_ours, compiled_theirs, eager)]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
        torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-12, atol=1e-12)
        for y in outputs:
            y.square().sum().backward()
        assert_same_grads(ours, theirs, rtol=0, atol=0)
        assert_same_grads(ours, eager, rtol=1e-10, atol=1e-10)
    assert_same_state(ours, theirs, rtol=0, atol=0)
    assert_same_state(ours, eager, rtol=1e-12, atol=1e-12)
    assert recorder.targets and not any("fusedbn" in t for t in recorder.targets), recorder.targets


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_keeps_our_ops(backend, training):
    """torch.export.export gives a program that runs and matches (running statistics included);
    run_decompositions keeps our custom ops (they are opaque to it) with identical results."""
    device, library = backend.device, backend.ops_library
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fusedbn.FusedBatchNormReLU2d(4), fusedbn.FusedBatchNorm2d(4))
    model = model.to(device).train(training)
    x = torch.randn(2, 3, 8, 8, device=device)
    op = "forward_train" if training else "forward_eval"
    for decompose in (False, True):
        twin = copy.deepcopy(model)
        exported = torch.export.export(copy.deepcopy(model), (x,))
        if decompose:
            exported = exported.run_decompositions()
        # The training op mutates the running statistics: decomposed, it runs inside auto_functionalized.
        calls = [node for node in exported.graph.nodes if node.op == "call_function"]
        targets = {str(node.args[0] if "auto_functionalized" in str(node.target) else node.target) for node in calls}
        assert f"{library}.{op}.default" in targets, targets
        module = exported.module()
        torch.testing.assert_close(module(x), twin(x), rtol=0, atol=0)
        assert_same_state(module, twin, rtol=0, atol=0)


@pytest.mark.slow  # torch.compile of a whole model
def test_compiled_fuse_model_gives_torchs_results():
    """torch.compile(fullgraph=True) of a model fuse_model rewrote (instance forwards) traces without a break
    and computes what the compiled torch model computes, bit for bit: outputs, gradients, eval outputs."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double()
    fused = fusedbn.fuse_model(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    compiled = [torch.compile(m, backend="aot_eager", fullgraph=True) for m in (model, fused)]
    theirs, ours = (c(x) for c in compiled)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    theirs.sum().backward()
    ours.sum().backward()
    assert_same_grads(fused, model, rtol=0, atol=0)
    model.eval()
    fused.eval()
    torch.testing.assert_close(compiled[1](x), compiled[0](x), rtol=0, atol=0)


def test_export_of_a_fuse_model_model():
    """torch.export reads a module's forward's code: the rewritten forwards offer a bound method's
    attributes, so a fused model exports, keeping the fused ops, and the program computes the model's output."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    fused = fusedbn.fuse_model(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(fused, (x,))
    assert sum("fusedbn" in str(node.target) for node in program.graph.nodes) == 20
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
