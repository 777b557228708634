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


# Shapes where the thread count changes how the work is split, though never a result (csrc/cpu/tiles.h, ops.cpp):
# channels-last channels split into 2 groups at one thread and 4 at two (4096 channels, 4 row parts); the
# channels-first backward's sums and dx in one sweep per channel at one thread (6 channel groups: at least 4 a
# thread) and in two passes at two and three; both at sizes run on one thread and on several.
SPLIT_BY_THREADS = [((8, 16, 32, 32), torch.contiguous_format), ((8, 16, 32, 32), torch.channels_last),
                    ((4, 4096, 4, 4), torch.channels_last), ((8, 6, 30, 30), torch.contiguous_format),
                    ((2, 6, 30, 30), torch.contiguous_format), ((3, 40, 7, 7), torch.contiguous_format)]


@pytest.mark.parametrize("shape, memory_format", SPLIT_BY_THREADS)
def test_results_do_not_depend_on_the_thread_count(torch_threads, shape, memory_format):
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(*shape, generator=gen).to(memory_format=memory_format) for _ in range(2))
    w, b = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    results = []
    for threads in (1, 2, 3):
        torch_threads(threads)
        y, mean, invstd = fusedbn.ops.forward_train(x, w, b, None, None, 0.1, 1e-5)
        results.append((y, mean, invstd, *fusedbn.ops.backward(dy, x, w, mean, invstd, True, [True] * 3)[:3]))
    for others in results[1:]:
        for one, other in zip(results[0], others):
            assert torch.equal(one, other)


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
