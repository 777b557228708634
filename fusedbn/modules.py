"""``FusedBatchNorm1d/2d/3d``: subclasses of ``nn.BatchNorm1d/2d/3d`` whose forward runs fusedbn, and
``FusedBatchNormReLU1d/2d/3d``: the same BatchNorm followed by ReLU (with an optional residual added
before it) in one op.

Constructor, parameters, buffers, ``state_dict``, ``.train()/.eval()`` and ``isinstance`` are torch's;
only ``forward`` differs.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import _apply, compiling_to_torch_ops


class _FusedForward:
    def _fused_forward(self, input: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
        if compiling_to_torch_ops():  # torch's own forward, line for line (momentum=None included)
            output = nn.modules.batchnorm._BatchNorm.forward(self, input)
            output = output if residual is None else output + residual
            return torch.relu(output) if relu else output
        self._check_input_dim(input)
        # Each attribute read once: a module's buffers and parameters are found by nn.Module.__getattr__, a
        # Python call each, which at small sizes costs as much as the kernel.
        training, track_running_stats, momentum = self.training, self.track_running_stats, self.momentum
        running_mean, running_var, num_batches_tracked = self.running_mean, self.running_var, self.num_batches_tracked
        tracks = training and track_running_stats and num_batches_tracked is not None
        factor = 0.0 if momentum is None else momentum
        if tracks and momentum is None:  # cumulative moving average
            factor = 1.0 / float(num_batches_tracked + 1)
        use_batch_stats = training or (running_mean is None and running_var is None)
        use_running = not training or track_running_stats
        output = _apply(
            input,
            running_mean if use_running else None,
            running_var if use_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            residual,
            relu,
        )
        # Counted only once the batch was accepted, so a rejected input leaves the module untouched.
        if tracks:
            num_batches_tracked.add_(1)
        return output


class _BatchNorm(_FusedForward):
    def forward(self, input: Tensor) -> Tensor:
        return self._fused_forward(input, None, False)


def _check_addable(input: Tensor, residual: Tensor) -> None:
    """Raises what ``bn(input) + residual`` would raise (shapes that do not broadcast, another device),
    where it would."""
    torch.broadcast_shapes(input.shape, residual.shape)
    if residual.device != input.device and not (residual.dim() == 0 and residual.device.type == "cpu"):
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{input.device} and {residual.device}! (residual)")


class _BatchNormReLU(_FusedForward):
    relu = True  # computes relu(bn(x) [+ residual]) itself (as FrozenBatchNorm*d(relu=True) does)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``relu(batch_norm(input) + residual)``, ``residual`` optional. A residual of another shape, dtype
        or device (broadcast or promoted, as ``+`` allows) is added unfused, so the result is still torch's."""
        if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype
                                     or residual.device != input.device):
            _check_addable(input, residual)  # before the BatchNorm updates its statistics
            return torch.relu(self._fused_forward(input, None, False) + residual)
        return self._fused_forward(input, residual, True)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", relu=True"


class FusedBatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d`."""


class FusedBatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d`."""


class FusedBatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d`."""


class FusedBatchNormReLU1d(_BatchNormReLU, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` then ReLU (after adding an optional residual), fused."""


class FusedBatchNormReLU2d(_BatchNormReLU, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` then ReLU (after adding an optional residual), fused."""


class FusedBatchNormReLU3d(_BatchNormReLU, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` then ReLU (after adding an optional residual), fused."""
