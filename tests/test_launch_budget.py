"""The CUDA ops' launch and allocation budget, counted through the SIMT emulator build (fusedbn._simt),
which runs the same host code (csrc/cuda/host_ops.h) as the CUDA build.

Per call, after a first call has made the per-stream scratch (csrc/cuda/scratch.h): training forward 2
kernels (1 where a channel fits one block), eval 1, backward 2 (1 where only one of its passes is
wanted), the SyncBatchNorm halves 1 each; no ATen op besides allocating the outputs (no fill, copy or
per-channel arithmetic), and no allocation beyond the outputs (the saved statistics are outputs of the
training forward). Shapes are picked so that the reductions take their grid merge (several blocks per
channel), where the arrival counters live.
"""
import importlib.util

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

if importlib.util.find_spec("fusedbn._simt") is None:
    pytest.skip("fusedbn._simt not built (make test builds it)", allow_module_level=True)
import fusedbn._simt

OPS = torch.ops.fusedbn_simt
# ATen ops that neither compute nor copy: views, the outputs' allocations, and aten::to of a tensor that
# already has the dtype (a copy would show as its child aten::_to_copy).
NON_COMPUTING = {"aten::to", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::reshape", "aten::view",
                 "aten::_reshape_alias", "aten::as_strided", "aten::movedim", "aten::permute",
                 "aten::lift_fresh", "aten::alias"}

SHAPES = {
    "channels-first": lambda: torch.randn(16, 3, 20, 20),
    "channels-last": lambda: torch.randn(64, 16, 4, 4).contiguous(memory_format=torch.channels_last),
}


def descendants(event):
    for child in event.cpu_children:
        yield child
        yield from descendants(child)


def count(call):
    """(kernel launches, allocations, ATen ops that compute) of one call of `call`, after a first one."""
    call()
    launches = fusedbn._simt.launch_count()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    launches = fusedbn._simt.launch_count() - launches
    (op,) = [e for e in prof.events() if e.name.startswith("fusedbn_simt::")]
    inner = list(descendants(op))
    allocations = sum(1 for e in [op, *inner] if e.self_cpu_memory_usage > 0)
    computing = sorted({e.name for e in inner} - NON_COMPUTING)
    return launches, allocations, computing


def params(C):
    return torch.randn(C), torch.randn(C), torch.randn(C), torch.rand(C) + 0.5


EPILOGUES = {"identity": {}, "relu": {"activation": "relu"}, "add-relu": {"activation": "relu", "residual": True}}


def epilogue_args(name, x):
    kwargs = dict(EPILOGUES[name])
    if kwargs.pop("residual", False):
        kwargs["residual"] = torch.randn_like(x)
    return kwargs


@pytest.mark.parametrize("layout", SHAPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_forward_train_launches_two_kernels_and_allocates_its_outputs(layout, epilogue):
    x = SHAPES[layout]()
    w, b, rm, rv = params(x.shape[1])
    kwargs = epilogue_args(epilogue, x)
    assert count(lambda: OPS.forward_train(x, w, b, rm, rv, 0.1, 1e-5, **kwargs)) == (2, 3, [])


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_forward_train_is_one_launch_where_a_channel_fits_a_block(epilogue):
    # host_ops.h launch_one_pass_forward: channels-first, 4 x 5 x 5 values a channel (28 windows of 4) fit
    # the emulator's 64-thread block at 4 windows a thread.
    x = torch.randn(4, 16, 5, 5)
    w, b, rm, rv = params(16)
    kwargs = epilogue_args(epilogue, x)
    assert count(lambda: OPS.forward_train(x, w, b, rm, rv, 0.1, 1e-5, **kwargs)) == (1, 3, [])


@pytest.mark.parametrize("layout", SHAPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["float-params", "bf16-params"])
def test_forward_eval_launches_one_kernel(layout, epilogue, param_dtype):
    x = SHAPES[layout]().bfloat16()
    w, b, rm, rv = (p.to(param_dtype) for p in params(x.shape[1]))
    kwargs = epilogue_args(epilogue, x)
    assert count(lambda: OPS.forward_eval(x, w, b, rm, rv, 1e-5, **kwargs)) == (1, 1, [])


@pytest.mark.parametrize("layout", SHAPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_launches_two_kernels_and_allocates_the_gradients(layout, epilogue, training):
    x = SHAPES[layout]()
    w, b, rm, rv = params(x.shape[1])
    y, mean, invstd = OPS.forward_train(x, w, b, rm, rv, 0.1, 1e-5, **epilogue_args(epilogue, x))
    residual = epilogue == "add-relu"
    # ReLU's mask from the output, as the autograd functions pass it; the residual's gradient where it has one.
    kwargs = {"bias": b, "grad_residual": residual}
    if epilogue != "identity":
        kwargs.update(activation="relu", output=y)
    dy = torch.randn_like(y)
    gradients = 3 + residual
    assert count(lambda: OPS.backward(dy, x, w, mean, invstd, training, [True, True, True], **kwargs)) == (
        2, gradients, [])
    # One pass where only one is wanted: the sums alone, or dx alone under eval statistics.
    assert count(lambda: OPS.backward(dy, x, w, mean, invstd, training, [False, True, True], **kwargs)) == (
        1 + residual, 2 + residual, [])
    if not training:
        assert count(lambda: OPS.backward(dy, x, w, mean, invstd, False, [True, False, False], **kwargs)) == (
            1, 1 + residual, [])


@pytest.mark.parametrize("layout", SHAPES)
def test_sync_batch_norm_halves_launch_one_kernel_each(layout):
    x = SHAPES[layout]()
    w, b, rm, rv = params(x.shape[1])
    _, mean, invstd = OPS.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    dy = torch.randn_like(x)
    assert count(lambda: OPS.batch_stats(x)) == (1, 2, [])
    assert count(lambda: OPS.grad_sums(dy, x, w, mean, invstd, bias=b)) == (1, 2, [])
    mean_dz, proj = torch.randn_like(mean), torch.randn_like(mean)
    assert count(lambda: OPS.backward_elemt(dy, x, w, mean, invstd, mean_dz, proj, bias=b)) == (1, 1, [])


def test_the_shapes_take_the_grid_merge():
    # The counters are used (and must reset themselves) only where a channel spans several blocks: with the
    # emulator's 2 SMs and 64-thread blocks, these shapes split each channel (see host_ops.h reduce_grid).
    # A second call on the same scratch must then give the same bits.
    for make in SHAPES.values():
        x = make()
        first, second = OPS.batch_stats(x), OPS.batch_stats(x)
        expected = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(first[0].double(), expected[1], rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
