"""Loads the compiled ops (torch.ops.fusedbn.*) and registers their fake kernels for torch.compile/export.

The fake kernels give each output the shape, dtype and memory layout the real kernels produce:
outputs follow the input's layout (channels-first contiguous or channels-last), statistics are
float32 (float64 for float64 input).
"""
import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (registers torch.ops.fusedbn)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last_dense(x: torch.Tensor) -> bool:
    return x.movedim(1, -1).is_contiguous()


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor laid out as the kernels lay out their output for input ``x``
    (mirrors csrc/layout.h: dense_input, channel_layout, empty_in_layout)."""
    if not (x.is_contiguous() or _is_channels_last_dense(x)):
        x = x.contiguous(memory_format=suggest_memory_format(x))
    positions = 1
    for size in x.shape[2:]:
        positions *= size
    if positions == 1 or not x.is_contiguous():
        strides = [0] * x.dim()
        stride, strides[1] = x.shape[1], 1  # C innermost, then the spatial dims in order, then N
        for d in range(x.dim() - 1, 1, -1):
            strides[d] = stride
            stride *= x.shape[d]
        strides[0] = stride
        return x.new_empty_strided(x.shape, strides)
    return x.new_empty(x.shape)


def _channel_stats(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


def register_fake_kernels(library: str) -> None:
    """Registers the fake (meta) kernels of ``library``'s ops; ``fusedbn``, and the test-only
    ``fusedbn_simt`` which shares its schemas."""

    @torch.library.register_fake(f"{library}::forward_train")
    def _forward_train_fake(input, weight, bias, running_mean, running_var, momentum, eps, residual=None,
                            relu=False):
        return empty_output(input), _channel_stats(input), _channel_stats(input)

    @torch.library.register_fake(f"{library}::forward_eval")
    def _forward_eval_fake(input, weight, bias, running_mean, running_var, eps, residual=None, relu=False):
        return empty_output(input)

    @torch.library.register_fake(f"{library}::backward")
    def _backward_fake(grad_output, input, weight, mean, invstd, training, output_mask, bias=None, output=None,
                       relu=False, grad_residual=False):
        param_dtype = weight.dtype if weight is not None else input.dtype
        channels = (input.shape[1],)
        grad_input = empty_output(input) if output_mask[0] else None
        grad_weight = input.new_empty(channels, dtype=param_dtype) if output_mask[1] else None
        grad_bias = input.new_empty(channels, dtype=param_dtype) if output_mask[2] else None
        return grad_input, grad_weight, grad_bias, empty_output(input) if grad_residual else None

    @torch.library.register_fake(f"{library}::batch_stats")
    def _batch_stats_fake(input):
        return _channel_stats(input), _channel_stats(input)

    @torch.library.register_fake(f"{library}::grad_sums")
    def _grad_sums_fake(grad_output, input, weight, mean, invstd, bias=None, output=None, relu=False):
        return _channel_stats(input), _channel_stats(input)

    @torch.library.register_fake(f"{library}::backward_elemt")
    def _backward_elemt_fake(grad_output, input, weight, mean, invstd, mean_dz, proj, bias=None, output=None,
                             relu=False, grad_residual=False):
        return empty_output(input), empty_output(input) if grad_residual else None


register_fake_kernels("fusedbn")
forward_train = torch.ops.fusedbn.forward_train
forward_eval = torch.ops.fusedbn.forward_eval
backward = torch.ops.fusedbn.backward
batch_stats = torch.ops.fusedbn.batch_stats
grad_sums = torch.ops.fusedbn.grad_sums
backward_elemt = torch.ops.fusedbn.backward_elemt
