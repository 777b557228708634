"""The CPU kernels run on as many threads as torch has (the build uses torch's parallel backend: setup.py),
and give bit-identical results whatever that number (the work is split by the shape alone); the build of
them loaded is the best for the CPU."""
import os
import subprocess
import sys
from pathlib import Path

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


def test_cpu_kernels_loaded_are_the_best_build_for_this_cpu():
    """fusedbn/ops.py loads the CPU kernels built for this machine where there is such a build (make's),
    else the best of the instruction-set builds (setup.py) that torch's CPU-capability choice allows: in a
    fresh process with ATEN_CPU_CAPABILITY=default, the baseline build."""
    builds = {path.name.split(".")[0][len("_cpu_"):] for path in Path(fusedbn.__file__).parent.glob("_cpu_*.so")}
    preference = {"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}.get(torch.backends.cpu.get_cpu_capability(), [])
    expected = next(b for b in ["native"] + preference + ["default"] if b in builds)
    assert fusedbn.ops.cpu_build == expected
    probe = "import fusedbn; print(fusedbn.ops.cpu_build)"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    loaded = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.split()[-1] == ("native" if "native" in builds else "default")
