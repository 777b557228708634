"""``FusedSyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group, with the
fusedbn kernels doing all per-element work, and ``convert_sync_batchnorm``.

Forward: each process computes its per-channel Welford moments (count, mean, M2), one ``all_gather``
of a single packed tensor brings everyone's, and the Chan formula merges them in rank order:
    n = sum n_k,  mean = sum n_k mean_k / n,  M2 = sum M2_k + sum n_k (mean_k - mean)^2.
Backward: each process reduces sum(dy) and sum(dy * (x - mean)), one ``all_reduce`` sums them, and the
elementwise pass uses the global sums. Counts travel inside the packed tensor (float64, exact), so no
step waits on the host and a training step stays CUDA-graph capturable.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import ops
from .functional import batch_norm, check_eps


def _local_moments(input: Tensor):
    channels = input.shape[1]
    if input.numel() == 0:  # an empty rank contributes nothing to the merge
        zeros = input.new_zeros(channels, dtype=ops.acc_dtype(input.dtype))
        return zeros, zeros
    return ops.batch_stats(input)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group, world_size):
        acc = ops.acc_dtype(input.dtype)
        channels = input.shape[1]
        mean, m2 = _local_moments(input)
        count = input.new_full((1,), input.numel() // max(1, channels), dtype=torch.float64)
        packed = torch.cat([count, mean.double(), m2.double()])
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=group)
        table = torch.stack(gathered)  # (world, 1 + 2C), merged in rank order
        counts, means, m2s = table[:, :1], table[:, 1:1 + channels], table[:, 1 + channels:]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total.clamp(min=1)
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        var = m2 / total.clamp(min=1)

        # Normalizing with given statistics is the eval op with (mean, biased var).
        mean, var = mean.to(acc), var.to(acc)
        output = ops.forward_eval(input, weight, bias, mean, var, eps)
        if running_mean is not None:
            # Unbiased variance, as nn.BatchNorm; a group with no values at all keeps the old statistics.
            unbiased = (m2 / (total - 1).clamp(min=1)).to(acc)
            keep = total == 0
            new_mean = running_mean.to(acc) * (1 - momentum) + mean * momentum
            new_var = running_var.to(acc) * (1 - momentum) + unbiased * momentum
            running_mean.copy_(torch.where(keep, running_mean.to(acc), new_mean))
            running_var.copy_(torch.where(keep, running_var.to(acc), new_var))

        invstd = torch.rsqrt(var + eps)  # bit for bit the forward_eval's
        ctx.save_for_backward(input, weight, mean, invstd, total)
        ctx.group, ctx.world_size = group, world_size
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd, total = ctx.saved_tensors
        channels = input.shape[1]
        if input.numel() == 0:
            zeros = mean.new_zeros(channels)
            sum_dz, sum_dz_xmu = zeros, zeros
        else:
            sum_dz, sum_dz_xmu = ops.grad_sums(grad_output, input, weight, mean, invstd)
        packed = torch.cat([sum_dz, sum_dz_xmu])
        dist.all_reduce(packed, group=ctx.group)
        global_dz, global_dz_xmu = packed[:channels], packed[channels:]
        n = total.to(mean.dtype).clamp(min=1)
        grad_input = None
        if ctx.needs_input_grad[0]:
            if input.numel() == 0:
                grad_input = torch.zeros_like(input)
            else:
                grad_input, _ = ops.backward_elemt(grad_output, input, weight, mean, invstd, global_dz / n,
                                                   invstd * invstd * global_dz_xmu / n)
        # Parameter gradients are this process's (DistributedDataParallel averages them).
        param_dtype = weight.dtype if weight is not None else input.dtype
        grad_weight = (sum_dz_xmu * invstd).to(param_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dz.to(param_dtype) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    process_group=None) -> Tensor:
    """Training-mode batch norm with statistics over every process of ``process_group`` (default: the
    world). Every process must call it, with any batch size (0 included) and the same channels."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("Default process group has not been initialized, please make sure to call "
                           "init_process_group.")
    check_eps(eps, True)
    group = process_group if process_group is not None else dist.group.WORLD
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps, group,
                                dist.get_world_size(group))


class FusedSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """:class:`torch.nn.SyncBatchNorm`'s arguments, state and behaviour, on GPUs (NCCL) and CPUs (gloo), with
    the fusedbn kernels; outside a process group, or in eval, it is the single-device fusedbn BatchNorm.

    It subclasses BatchNorm's common base rather than ``nn.SyncBatchNorm``, which
    DistributedDataParallel refuses on CPU modules.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        tracks = self.training and self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if tracks and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        initialized = dist.is_available() and dist.is_initialized()
        if self.process_group is not None and not initialized:
            raise RuntimeError("FusedSyncBatchNorm was given a process group, but the default process group has "
                               "not been initialized, please make sure to call init_process_group.")
        group = self.process_group if self.process_group is not None else (dist.group.WORLD if initialized else None)
        if use_batch_stats and self.training and group is not None and dist.get_world_size(group) > 1:
            output = sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                                     group)
        else:
            output = batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                                self.eps)
        if tracks:
            self.num_batches_tracked.add_(1)
        return output


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: returns ``module`` with every BatchNorm
    layer (torch's or fusedbn's, any dimensionality) replaced by a :class:`FusedSyncBatchNorm` holding
    the same parameters and buffers."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, FusedSyncBatchNorm):
        converted = FusedSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
