"""What this install of fusedbn is and whether it works: `python -m fusedbn`, or fusedbn.info().

It prints fusedbn's, torch's and CUDA's versions, the CPU build of the kernels that was loaded and why, the
thread count, whether the CUDA kernels and the SIMT emulator were built, and the visible GPUs; then a
self-check: one training step of FusedBatchNorm2d against nn.BatchNorm2d on each available device (output,
the three gradients, both running statistics). The exit status is 1 if any device's check fails.
"""
import importlib.util
import os
import sys
import time

import torch

from . import ops
from ._version import __version__

# The self-check's batch: small enough to take well under a second on any device, large enough for several
# threads' tiles. Two results agree where they differ by at most _CHECK_TOLERANCE of the tensor's largest
# magnitude (at least 1): the gradients of the weight and bias are sums of thousands of terms, whose float32
# rounding grows with the terms, not with the sum.
_CHECK_SHAPE = (8, 32, 24, 24)
_CHECK_TOLERANCE = 1e-5


def _cpu_build_line() -> str:
    if ops.cpu_build == "native":
        return "native (built for this machine's instructions: FUSEDBN_CPU_ARCH)"
    capability = torch.backends.cpu.get_cpu_capability()
    override = os.environ.get("ATEN_CPU_CAPABILITY")
    why = f"torch's CPU capability {capability}" + (f", ATEN_CPU_CAPABILITY={override}" if override else "")
    return f"{ops.cpu_build} (the best build for {why})"


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{ops.namespace}::forward_train", "CUDA")


def cuda_archs() -> str:
    """The architectures the CUDA kernels were built for ("sm_80,sm_90,compute_90": machine code sm_XY, PTX
    compute_XY); "" in a CPU-only build."""
    return torch.ops.fusedbn._cuda_archs()


def unsupported_gpu_message(index: int) -> str:
    """"" where GPU `index` can run the CUDA kernels built, else the error its first call would raise."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.ops.fusedbn._unsupported_gpu_message(cuda_archs(), major, minor, torch.cuda.get_device_name(index))


def _has_emulator() -> bool:
    return importlib.util.find_spec(f"{__package__}._simt") is not None


def _gpus() -> list:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def check_device(device: torch.device) -> dict:
    """One training step of FusedBatchNorm2d and nn.BatchNorm2d on the same batch and parameters on `device`:
    {"difference": the largest difference over the output, the input's, weight's and bias's gradients and the
    running statistics, each over its tensor's largest magnitude (at least 1), "ok": whether it is within
    _CHECK_TOLERANCE, "seconds": the time taken}."""
    from .modules import FusedBatchNorm2d

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(_CHECK_SHAPE, generator=generator) * 3 + 1).to(device)
    grad_out = torch.randn(_CHECK_SHAPE, generator=generator).to(device)
    channels = _CHECK_SHAPE[1]
    results = []
    for module in (torch.nn.BatchNorm2d(channels), FusedBatchNorm2d(channels)):
        module = module.to(device)
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, channels))
            module.bias.copy_(torch.linspace(-1, 1, channels))
        inp = x.clone().requires_grad_()
        out = module(inp)
        out.backward(grad_out)
        results.append([out, inp.grad, module.weight.grad, module.bias.grad, module.running_mean, module.running_var])
    difference = max(((actual - expected).abs().max() / expected.abs().max().clamp(min=1)).item()
                     for expected, actual in zip(*results))
    return {"difference": difference, "ok": difference <= _CHECK_TOLERANCE, "seconds": time.perf_counter() - start}


def info(file=None) -> bool:
    """Prints what was built and what will run, then the self-check on each device (check_device). Returns
    whether every device passed."""
    file = file or sys.stdout

    def say(name, value):
        print(f"{name:<16}{value}", file=file)

    say("fusedbn", __version__)
    say("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    say("CPU kernels", _cpu_build_line())
    say("threads", torch.get_num_threads())
    say("CUDA kernels", f"built for {cuda_archs()}" if _has_cuda_kernels() else "not built (a CPU-only build)")
    say("emulator", "built (fusedbn._simt)" if _has_emulator() else "not built (FUSEDBN_SIMT=1 builds it)")
    passed = True
    devices = [torch.device("cpu")]
    for index in _gpus():
        major, minor = torch.cuda.get_device_capability(index)
        say(f"GPU {index}", f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor}")
        problem = unsupported_gpu_message(index) if _has_cuda_kernels() else "no CUDA kernels in this build"
        if problem:
            say(f"check cuda:{index}", f"FAILED: {problem}")
            passed = False
        else:
            devices.append(torch.device("cuda", index))
    if not _gpus():
        say("GPUs", "none visible")
    for device in devices:
        try:
            result = check_device(device)
        except Exception as error:  # noqa: BLE001  (any failure of the check is its verdict)
            say(f"check {device}", f"FAILED: {type(error).__name__}: {error}")
            passed = False
            continue
        verdict = "ok" if result["ok"] else "FAILED"
        say(f"check {device}", f"{verdict}: fusedbn and nn.BatchNorm2d differ by {result['difference']:.1e} of each "
                               f"result's scale over a training step (limit {_CHECK_TOLERANCE:.0e}), "
                               f"{result['seconds']:.2f} s")
        passed = passed and result["ok"]
    return passed


def main() -> int:
    return 0 if info() else 1
