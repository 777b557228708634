"""The CPU kernels run on as many threads as torch has (the build uses torch's parallel backend: setup.py),
and give bit-identical results whatever that number (the work is split by the shape alone)."""
import pytest
import torch

import fusedbn


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for the test, restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_parallel_for_runs_on_every_thread(torch_threads, memory_format):
    x = torch.randn(8, 16, 64, 64).to(memory_format=memory_format)  # 16 parts or more: enough for 2 threads
    for threads in (1, 2):
        torch_threads(threads)
        assert torch.ops.fusedbn._reduction_threads(x) == threads


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_results_do_not_depend_on_the_thread_count(torch_threads, memory_format):
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(8, 16, 32, 32, generator=gen).to(memory_format=memory_format) for _ in range(2))
    w, b = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    results = []
    for threads in (1, 2):
        torch_threads(threads)
        y, mean, invstd = fusedbn.ops.forward_train(x, w, b, None, None, 0.1, 1e-5)
        results.append((y, mean, invstd, *fusedbn.ops.backward(dy, x, w, mean, invstd, True, [True] * 3)[:3]))
    for one, two in zip(*results):
        assert torch.equal(one, two)
