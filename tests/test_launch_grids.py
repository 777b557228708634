"""Every launch at ResNet-50's shapes (batch 256) on an H200 is at most one wave of blocks (issue 28): a
grid past one wave leaves a second, nearly empty wave that costs almost as much as the first.

The launches are the host code's own (csrc/cuda/host_ops.h), recorded by the SIMT emulator with an
H200-shaped device without running the kernels (fusedbn._simt.set_record_only). Each is checked against
the occupancy of its kernel in the sm_90 build (registers and shared memory read by benchmarks/sass.py
from `cuobjdump`, the library named by $FUSEDBN_SASS_LIBRARY or the fusedbn._C this Python imports), an
oracle independent of the host code's own sizing.
"""
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import launch_plans  # noqa: E402
import sass  # noqa: E402

simt = pytest.importorskip("fusedbn._simt", reason="fusedbn._simt not built (make test builds it)")

H200_SMS = 132
RESNET50_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14),
                   (256, 2048, 7, 7)]


@pytest.fixture(scope="module")
def sm90_kernels():
    try:
        found = sass.kernels(sass.default_library())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not found:
        pytest.skip("the library has no sm_90 code (built without CUDA)")
    return {launch_plans.kernel_key(k.name): k for k in found}


@pytest.fixture
def recording():
    """The emulator as an H200 that records launches instead of running them; restored afterwards."""
    device, record_only = simt.device()["name"], simt.record_only()
    simt.set_device("h200")
    simt.set_record_only(True)
    simt.recorded_launches()
    yield simt.recorded_launches
    simt.set_device(device)
    simt.set_record_only(record_only)


def training_step_launches(shape, dtype, channels_last, recorded_launches):
    """The launches of forward_train, backward (all gradients) and forward_eval on empty tensors."""
    ops = torch.ops.fusedbn_simt
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, memory_format=fmt)
    C = shape[1]
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    _, mean, invstd = ops.forward_train(x, w, b, rm, rv, 0.1, 1e-5, None, "identity", 0.0)
    ops.backward(x, x, w, mean, invstd, True, [True, True, True], b, None, None, "identity", 0.0, False)
    ops.forward_eval(x, w, b, rm, rv, 1e-5, None, "relu", 0.0)
    return recorded_launches()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", RESNET50_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_grid_is_at_most_one_wave(sm90_kernels, recording, shape, dtype, channels_last):
    launches = training_step_launches(shape, dtype, channels_last, recording)
    assert launches, "no launch recorded"
    over = []
    for launch in launches:
        key = launch_plans.kernel_key(launch["kernel"])
        assert key in sm90_kernels, f"{launch['kernel']} is not in the sm_90 build"
        threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
        wave = H200_SMS * sass.blocks_per_sm(sm90_kernels[key], threads, launch["shared"])
        blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
        if blocks > wave:
            over.append(f"{sm90_kernels[key].short_name}: grid {launch['grid']} x block {launch['block']} = "
                        f"{blocks} blocks, one wave is {wave}")
    assert not over, "grids past one wave:\n" + "\n".join(over)
