"""Loads the compiled ops (torch.ops.fusedbn.*).

Their meta kernels, used on the meta device and by FakeTensor tracing (torch.compile, torch.export), are
C++ (csrc/meta_kernels.h): they run the real kernels' argument checks and give each output the shape,
dtype and strides the real kernels produce.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.fusedbn)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


forward_train = torch.ops.fusedbn.forward_train
forward_eval = torch.ops.fusedbn.forward_eval
backward = torch.ops.fusedbn.backward
batch_stats = torch.ops.fusedbn.batch_stats
grad_sums = torch.ops.fusedbn.grad_sums
backward_elemt = torch.ops.fusedbn.backward_elemt
