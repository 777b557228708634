"""``revert_model``: every fusedbn module of a model back to torch's, in place, for deployment and for tools
that know only torch's classes."""
from typing import Optional

from torch import nn

from .convert import original_class
from .fuse import RewrittenForward
from .modules import FusedBatchNormReLU1d, FusedBatchNormReLU2d, FusedBatchNormReLU3d
from .report import Report

_TORCH_FOR_FUSED_RELU = {FusedBatchNormReLU1d: nn.BatchNorm1d, FusedBatchNormReLU2d: nn.BatchNorm2d,
                         FusedBatchNormReLU3d: nn.BatchNorm3d}


def revert_model(model: nn.Module, *, report: Optional[Report] = None) -> nn.Module:
    """Undoes ``convert_model`` and ``fuse_model`` in place and returns ``model``: each module whose forward
    ``fuse_model`` rewrote gets its class's forward back (which calls the BatchNorm, then the activation
    module or function, as before fusing), and every ``FusedBatchNorm*d`` and fused BatchNorm becomes the
    ``nn.BatchNorm*d`` it was, parameters, buffers and hooks unchanged. A ``FusedBatchNormReLU*d`` built by
    hand (no rewritten forward calls it, so no code applies its relu) is left as it is, recorded in
    ``report``."""
    report = Report() if report is None else report
    names = {id(m): name for name, m in model.named_modules()}
    unfused = set()
    for owner in model.modules():
        forward = owner.__dict__.get("forward")
        if isinstance(forward, RewrittenForward):
            del owner.forward
            unfused |= {id(owner.get_submodule(target)) for target in forward.fused}
            report.done.append(("reverted", names[id(owner)], "forward"))
    for name, module in model.named_modules():
        torch_class = original_class(type(module))
        if torch_class is None and type(module) in _TORCH_FOR_FUSED_RELU:
            if id(module) not in unfused:
                report.skipped.append((name, "a FusedBatchNormReLU module not made by fuse_model: no torch "
                                             "module computes BatchNorm and relu in one call"))
                continue
            torch_class = _TORCH_FOR_FUSED_RELU[type(module)]
        if torch_class is not None:
            module.__class__ = torch_class
            report.done.append(("reverted", name, torch_class.__name__))
    return model
