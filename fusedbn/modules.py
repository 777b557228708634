"""``FusedBatchNorm1d/2d/3d``: subclasses of ``nn.BatchNorm1d/2d/3d`` whose forward runs fusedbn.

Constructor, parameters, buffers, ``state_dict``, ``.train()/.eval()`` and ``isinstance`` are torch's;
only ``forward`` differs.
"""
from torch import Tensor, nn

from .functional import batch_norm


class _FusedForward:
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        tracks = self.training and self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if tracks and self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked + 1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        output = batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        # Counted only once the batch was accepted, so a rejected input leaves the module untouched.
        if tracks:
            self.num_batches_tracked.add_(1)
        return output


class FusedBatchNorm1d(_FusedForward, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d`."""


class FusedBatchNorm2d(_FusedForward, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d`."""


class FusedBatchNorm3d(_FusedForward, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d`."""
