"""``FusedSyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group, with the
fusedbn kernels doing all per-element work, and ``convert_sync_batchnorm``.

Forward: each process checks its arguments and computes its per-channel Welford moments (count, mean,
M2); one ``all_gather`` of a single packed tensor of a size every rank knows, (code, count, mean, M2),
brings everyone's, and the Chan formula merges them in rank order:
    n = sum n_k,  mean = sum n_k mean_k / n,  M2 = sum M2_k + sum n_k (mean_k - mean)^2.
A rank that rejects its arguments still sends its row, with a nonzero code naming the exception type,
so every rank raises (none is left waiting in a collective, none updates its state). Backward: each
process reduces sum(dy) and sum(dy * (x - mean)), one ``all_reduce`` sums them, and the elementwise pass
uses the global sums. Counts travel inside the packed tensor (float64, exact); the host reads the codes
and counts once per step (twice without weight, bias and running statistics: a first gather agrees on
the channel count), except under CUDA graph capture (replays run no Python), where only the local
checks raise, so a training step stays capturable. Running statistics (and num_batches_tracked) are
written last, in one place, once nothing can fail.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from ._functions import SyncFunction
from ._fx import as_fx_leaf
from .functional import check_eps, counted_apply, run_batch_norm
from .fuse import RewrittenForward
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, running_statistics_use
from .report import Report

# What a rank's rejection is reported as on the other ranks: code 1 + the index of the first type here the
# exception is an instance of (NotImplementedError is a RuntimeError, so it comes first); 0 is valid.
_ERRORS = (NotImplementedError, IndexError, ValueError, TypeError, RuntimeError, Exception)


def _code(pending: list) -> int:
    return 1 + next(i for i, kind in enumerate(_ERRORS) if isinstance(pending[0], kind)) if pending else 0


def _meta(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` on the meta device with what the op's checks read: shape, strides (an expanded tensor stays
    expanded), dtype and requires_grad; no data is copied."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)


# A rank's own exception travels in a list ("pending", empty when valid) popped when raised: held by a local
# variable, it would sit in its own traceback's frames, a reference cycle keeping those frames' tensors
# and process group alive until the garbage collector runs (at exit, after destroy_process_group, gloo
# then aborts the process).

def _local_errors(input, weight, bias, running_mean, running_var, momentum, eps, module_checks) -> list:
    """[the exception this rank's arguments raise], or [] if valid: the module's checks, then the
    single-process op's own, run by its meta kernel on meta copies (in the caller's grad mode, which
    decides whether a running statistic may require grad). Only the device check is done here, as every
    meta copy is on one device."""
    try:
        for check in module_checks:
            check(input)
        check_eps(eps, True)
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
            if t is not None and t.device != input.device:
                raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {input.device} and {t.device}! ({name})")
        meta = _meta(input)
        if meta.dim() >= 2 and meta.numel() == meta.size(1):
            # One value per channel here is fine when other ranks have more: the merged count is checked.
            meta = meta.new_empty((2, *meta.shape[1:]))
        ops.forward_train(meta, *map(_meta, (weight, bias, running_mean, running_var)), momentum, eps)
    except Exception as error:  # noqa: BLE001 - any of them must reach the other ranks
        return [error]
    return []


def _gather(row: Tensor, group, world_size: int) -> Tensor:
    gathered = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(gathered, row, group=group)
    return torch.stack(gathered)  # (world, len(row)), in rank order


def _raise_if_rejected(codes, pending: list) -> None:
    """Every rank raises if any rank rejected its arguments: that rank its own exception, the others
    one of the same type naming it."""
    if pending:
        raise pending.pop()
    rejected = [rank for rank, code in enumerate(codes) if code]
    if rejected:
        kind = _ERRORS[int(codes[rejected[0]]) - 1]
        others = f" (ranks {rejected} rejected theirs)" if len(rejected) > 1 else ""
        raise kind(f"sync_batch_norm: rank {rejected[0]} of the process group rejected its input with "
                   f"{kind.__name__}{others}, see that rank's error; no rank updated its running statistics")


def _agreed_channels(input, pending, device, group, world_size) -> int:
    """The channel count when no per-channel tensor tells it: a first tiny all_gather of (code, channels)
    (only in that case: weight, bias and running statistics have the same numel on every rank)."""
    header = [_code(pending), -1 if pending else input.size(1)]
    table = _gather(torch.tensor(header, dtype=torch.float64, device=device), group, world_size)
    codes, channels = table.long().t().tolist()
    _raise_if_rejected(codes, pending)
    if len(set(channels)) > 1:
        raise RuntimeError(f"sync_batch_norm: the ranks' inputs have different numbers of channels, {channels}")
    return channels[0]


def _local_row(input, channels, pending, device) -> Tensor:
    """This rank's (code, count, mean, M2) row of 2 + 2 * channels float64 values. An exception raised
    computing the moments (e.g. by a check the meta kernel lacks) joins ``pending``, sent like a rejection."""
    if not pending:
        try:
            if input.size(1) != channels:  # the row's size, which every rank must agree on
                raise RuntimeError(f"sync_batch_norm: expected input with {channels} channels, got {input.size(1)}")
            count = input.new_full((1,), input.numel() // max(1, channels), dtype=torch.float64)
            if input.numel() == 0:  # an empty rank contributes nothing to the merge
                mean = m2 = input.new_zeros(channels, dtype=torch.float64)
            else:
                mean, m2 = ops.batch_stats(input)
            return torch.cat([count.new_zeros(1), count, mean.double(), m2.double()])
        except Exception as error:  # noqa: BLE001
            pending.append(error)
    row = torch.zeros(2 + 2 * channels, dtype=torch.float64, device=device)
    row[0] = _code(pending)
    return row


def _running_update(old, batch, momentum, keep):
    """nn.BatchNorm's update (1 - momentum) * old + momentum * batch (the ops' running_update, csrc/welford.h),
    old kept where ``keep``."""
    return torch.where(keep, old, old * (1 - momentum) + batch * momentum)


def _write_state(running_mean, running_var, num_batches_tracked, new_mean, new_var) -> None:
    """The step's only write to the module's state, after everything that can fail. Under inference_mode
    it also updates buffers created under inference_mode, and autograd does not record it."""
    with torch.inference_mode():
        if running_mean is not None:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)


def _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, group,
                     num_batches_tracked=None, module_checks=()):
    """sync_batch_norm, plus the module's num_batches_tracked (written with the running statistics) and
    its input checks (exchanged like the op's)."""
    world_size = dist.get_world_size(group)
    pending = _local_errors(input, weight, bias, running_mean, running_var, momentum, eps, module_checks)
    tensors = [t for t in (input, weight, bias, running_mean, running_var) if isinstance(t, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    # Reading the gathered rows waits on the device. Under CUDA graph capture there is nothing to read yet
    # (and replays run no Python): only this rank's own checks raise, and its input gives the channels.
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        _raise_if_rejected([], pending)
    with torch.no_grad():
        channels = next((t.numel() for t in (weight, bias, running_mean, running_var) if isinstance(t, Tensor)),
                        None)
        if channels is None:
            channels = input.size(1) if capturing else _agreed_channels(input, pending, device, group, world_size)
        table = _gather(_local_row(input, channels, pending, device), group, world_size)
        head = [] if capturing else table[:, :2].tolist()  # (code, count) per rank: the step's one host wait
        _raise_if_rejected([code for code, _ in head], pending)
        if sum(count for _, count in head) == 1:  # the single-process op's check, on the merged count
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{tuple(input.shape)} on this rank and 1 value per channel over the process group")
        counts, means, m2s = table[:, 1:2], table[:, 2:2 + channels], table[:, 2 + channels:]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total.clamp(min=1)
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        acc = ops.acc_dtype(input.dtype)
        var = (m2 / total.clamp(min=1)).to(acc)
        mean = mean.to(acc)
        new_mean = new_var = None
        if running_mean is not None:
            # Unbiased variance, as nn.BatchNorm; a group with no values at all keeps the old statistics.
            unbiased = (m2 / (total - 1).clamp(min=1)).to(acc)
            keep = total == 0
            new_mean = _running_update(running_mean.to(acc), mean, momentum, keep)
            new_var = _running_update(running_var.to(acc), unbiased, momentum, keep)
    # Normalizing with given statistics is the eval op with (mean, biased var).
    output = SyncFunction.apply(input, weight, bias, mean, var, total, eps, group)
    _write_state(running_mean, running_var, num_batches_tracked, new_mean, new_var)
    return output


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    process_group=None) -> Tensor:
    """Training-mode batch norm with statistics over every process of ``process_group`` (default: the
    world). Every process must call it, with any batch size (0 included), the same channels, and
    weight, bias and running statistics given alike (the same number of elements) on every rank. If any
    rank's arguments are invalid, every rank raises and none updates its running statistics."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("Default process group has not been initialized, please make sure to call "
                           "init_process_group.")
    group = process_group if process_group is not None else dist.group.WORLD
    return _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, group)


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
        leaf = as_fx_leaf(self, input)
        if leaf is not None:
            return leaf
        tracks, factor, use_batch_stats, use_running = running_statistics_use(
            self.training, self.track_running_stats, self.momentum, self.num_batches_tracked, self.running_mean,
            self.running_var)
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        initialized = dist.is_available() and dist.is_initialized()
        if self.process_group is not None and not initialized:
            raise RuntimeError("FusedSyncBatchNorm was given a process group, but the default process group has "
                               "not been initialized, please make sure to call init_process_group.")
        group = self.process_group if self.process_group is not None else (dist.group.WORLD if initialized else None)
        checks = (self._check_input_dim, self._check_non_zero_input_channels)
        if self.training and group is not None and dist.get_world_size(group) > 1:
            # The module's checks travel with the op's: a rank raising alone would leave the others waiting.
            return _sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                                    group, self.num_batches_tracked if tracks else None, checks)
        for check in checks:
            check(input)
        args = (input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps)
        return counted_apply(self.num_batches_tracked, run_batch_norm, *args) if tracks else run_batch_norm(*args)


def convert_sync_batchnorm(module: nn.Module, process_group=None, *, report: Optional[Report] = None) -> nn.Module:
    """Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: returns ``module`` with every BatchNorm
    layer (torch's or fusedbn's, any dimensionality) replaced by a :class:`FusedSyncBatchNorm` holding
    the same parameters and buffers; ``report`` (a :class:`fusedbn.Report`), when given, records each.
    A BatchNorm+activation that ``fuse_model`` made converts too (the rewritten forward then applies the
    activation: the relu, or an nn.PReLU with its weight);
    a BatchNorm that computes anything else (a ``FusedBatchNormReLU*d`` called directly, timm's
    ``BatchNormAct2d``, another subclass) raises NotImplementedError, before anything is converted."""
    report = Report() if report is None else report
    made_by_fuse = {id(owner.get_submodule(target)) for owner in module.modules()
                    if isinstance(owner.__dict__.get("forward"), RewrittenForward)
                    for target in owner.__dict__["forward"].fused}
    for name, child in module.named_modules():
        if (isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) not in _SYNCABLE
                and not isinstance(child, FusedSyncBatchNorm) and id(child) not in made_by_fuse):
            raise NotImplementedError(
                f"fusedbn.convert_sync_batchnorm: {name or 'the model'} is a {type(child).__name__}, which computes "
                "more than a BatchNorm; FusedSyncBatchNorm would drop the rest (for timm's norm-act layers, convert "
                "with timm.layers.convert_sync_batchnorm first)")
    return _convert_sync(module, process_group, "", report)


_SYNCABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, FusedBatchNorm1d, FusedBatchNorm2d,
             FusedBatchNorm3d)


def _convert_sync(module: nn.Module, process_group, name: str, report: Report) -> nn.Module:
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
        report.done.append(("synced", name, type(module).__name__))
    for child_name, child in module.named_children():
        converted.add_module(child_name, _convert_sync(child, process_group, f"{name}.{child_name}" if name else child_name,
                                                       report))
    return converted
