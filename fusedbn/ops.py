"""Loads the compiled ops (torch.ops.fusedbn.*).

Their meta kernels, used on the meta device and by FakeTensor tracing (torch.compile, torch.export), are
C++ (csrc/meta_kernels.h): they run the real kernels' argument checks and give each output the shape,
dtype and strides the real kernels produce.
"""
import importlib

import torch

from . import _C  # noqa: F401  (registers torch.ops.fusedbn)

# Builds of the CPU kernels worth trying per torch.backends.cpu.get_cpu_capability(), best first (setup.py).
_CPU_BUILDS = {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}


def _load_cpu_kernels():
    """Imports one build of the CPU kernels (registering them): the one built for this machine
    (FUSEDBN_CPU_ARCH) where there is one, else the best instruction set both the CPU and torch's choice
    allow (ATEN_CPU_CAPABILITY overrides torch's choice), else the baseline build. Returns its name."""
    for build in ("native",) + _CPU_BUILDS.get(torch.backends.cpu.get_cpu_capability(), ()) + ("default",):
        try:
            importlib.import_module(f"{__package__}._cpu_{build}")
        except ModuleNotFoundError:
            continue
        return build
    raise ImportError("fusedbn: no build of the CPU kernels (fusedbn/_cpu_*.so) was found; rebuild fusedbn")


cpu_build = _load_cpu_kernels()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The namespace of the ops below, whose ops fusedbn._C's eager autograd (csrc/autograd.cpp) calls too. The tests
# route fusedbn's calls to the emulator's library by setting both (tests/helpers.py, route_ops).
namespace = "fusedbn"
forward_train = torch.ops.fusedbn.forward_train
forward_eval = torch.ops.fusedbn.forward_eval
backward = torch.ops.fusedbn.backward
batch_stats = torch.ops.fusedbn.batch_stats
grad_sums = torch.ops.fusedbn.grad_sums
backward_elemt = torch.ops.fusedbn.backward_elemt
