"""Checks that only make sense on a real GPU: streams, device guards, CUDA graphs, determinism and
sizes beyond 32-bit launch and index limits. The rest of the suite also runs on CUDA through the device
fixture."""
import threading

import pytest
import torch
from torch import nn

import fusedbn
from helpers import assert_as_accurate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def _train_step(module, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


def _fresh(channels, **kwargs):
    torch.manual_seed(0)
    module = fusedbn.FusedBatchNorm2d(channels, device="cuda", **kwargs)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module


SHAPES = [(4, 6, 9, 11), (8, 64, 40, 40), (2, 3, 300, 301)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_same_results_on_any_stream_and_bitwise_repeatable(shape, memory_format):
    x = torch.randn(shape, device="cuda").to(memory_format=memory_format)
    grad = torch.randn_like(x)
    results = []
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.current_stream()):
        module = _fresh(shape[1])
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = _train_step(module, x, grad) + (module.running_mean.clone(), module.running_var.clone())
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        results.append(outputs)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_reductions_on_concurrent_streams_and_threads_agree():
    """The grid merge's counters and partials and the backward's per-channel terms are per host thread and
    stream (csrc/cuda/scratch.h): ops running at once on two streams, or from two threads on one stream,
    give the bits of one op at a time."""
    shape = (64, 2, 64, 64)  # two channels, each over many blocks: the grid merge
    xs = [torch.randn(shape, device="cuda") for _ in range(4)]
    expected = [_train_step(_fresh(2), x, torch.ones_like(x)) for x in xs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    on_streams = []
    for i in range(8):
        with torch.cuda.stream(streams[i % 2]):
            on_streams.append(_train_step(_fresh(2), xs[i % 4], torch.ones_like(xs[i % 4])))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    from_threads = [None] * 8
    modules = [_fresh(2) for _ in range(8)]  # made here: the threads would race on the random generator

    def work(i):
        from_threads[i] = _train_step(modules[i], xs[i % 4], torch.ones_like(xs[i % 4]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    for i, result in enumerate(on_streams + from_threads):
        assert all(torch.equal(a, b) for a, b in zip(result, expected[i % 4])), i


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to put the input on a non-current device")
def test_non_default_device_is_guarded():
    torch.cuda.set_device(0)
    x = torch.randn(4, 5, 6, 7, device="cuda:1")
    ours, ref = fusedbn.FusedBatchNorm2d(5).to("cuda:1"), nn.BatchNorm2d(5).to("cuda:1")
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cuda_graph_replay_equals_eager(memory_format):
    """Training forward+backward captured once and replayed: no host sync, no data-dependent allocation."""
    shape = (8, 64, 40, 40)
    model, eager = _fresh(64), _fresh(64)
    static_x = torch.randn(shape, device="cuda").to(memory_format=memory_format).requires_grad_(True)
    static_grad = torch.randn(shape, device="cuda").to(memory_format=memory_format)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graph requires
        for _ in range(2):
            model(static_x).backward(static_grad)
    torch.cuda.current_stream().wait_stream(side)
    eager.load_state_dict(model.state_dict())
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.backward(static_grad)
    for step in range(3):
        x = torch.randn(shape, device="cuda").to(memory_format=memory_format)
        grad = torch.randn(shape, device="cuda").to(memory_format=memory_format)
        with torch.no_grad():
            static_x.copy_(x)
            static_grad.copy_(grad)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        y, gx, gw, gb = _train_step(eager, x, grad)
        torch.cuda.synchronize()
        assert torch.equal(static_y, y), step
        assert torch.equal(static_x.grad, gx), step
        assert torch.equal(model.weight.grad, gw) and torch.equal(model.bias.grad, gb), step
        assert torch.equal(model.running_mean, eager.running_mean), step
        assert torch.equal(model.running_var, eager.running_var), step


@pytest.mark.parametrize("layout", ["(N, C)", "NCHW", "NHWC"])
def test_batch_larger_than_65535(layout):
    shape = (70000, 4) if layout == "(N, C)" else (70000, 3, 2, 2)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = torch.randn(shape, device="cuda", dtype=torch.float64).to(memory_format=fmt) * 3 + 1
    cls, ref_cls = (fusedbn.FusedBatchNorm1d, nn.BatchNorm1d) if len(shape) == 2 else (fusedbn.FusedBatchNorm2d, nn.BatchNorm2d)
    ours, ref = cls(shape[1], device="cuda", dtype=torch.float64), ref_cls(shape[1], device="cuda", dtype=torch.float64)
    grad = torch.randn_like(x)
    for module in (ours, ref):
        module.weight.data.fill_(1.5)
    results = [_train_step(m, x, grad) for m in (ours, ref)]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """bfloat16 input of 2^31 + 2^20 elements over 2 channels: 64-bit indexing and counts everywhere."""
    n = 2**31 + 2**20
    x = torch.empty((2, 2, n // 4), device="cuda", dtype=torch.bfloat16).normal_()
    x[:, 1] += 3.0
    running_mean, running_var = torch.zeros(2, device="cuda"), torch.ones(2, device="cuda")
    y, mean, invstd = fusedbn.ops.forward_train(x, None, None, running_mean, running_var, 1.0, 1e-5)
    # float64 reference statistics, one channel at a time.
    for c in range(2):
        values = x[:, c].double()
        var, mu = torch.var_mean(values, correction=0)
        assert abs(mean[c].item() - mu.item()) < 1e-4
        assert abs(invstd[c].item() - (var.item() + 1e-5) ** -0.5) < 1e-4
        assert abs(running_var[c].item() - var.item() * values.numel() / (values.numel() - 1)) < 1e-4
        del values
    tail = x[:, :, -1000:].double()
    expected = (tail - mean.double().view(1, 2, 1)) * invstd.double().view(1, 2, 1)
    assert_as_accurate(y[:, :, -1000:], expected.to(torch.bfloat16), expected, torch.bfloat16, "output tail")
